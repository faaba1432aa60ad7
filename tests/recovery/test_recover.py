"""Recovery: LoRA merged back (peft), full training, sparsity and shapes kept, resumption, data formats."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import layerprune as lp
from layerprune.errors import LayerpruneError
from layerprune.recovery import RecoveryConfig, load_training_data, recover
from layerprune.recovery.data import IGNORE, PROMPT_NO_INPUT, training_data

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is many times faster

SMALL = {"batch_size": 2, "warmup": 0, "save_every": 2}


def fresh(dtype=torch.float32):
    return lp.load("fixture", device="cpu", dtype=dtype, quiet=True)


@pytest.fixture(scope="module")
def train_text(tmp_path_factory):
    """The start of fixture:train (tokenizing all 1.4 MB of it in every test costs seconds)."""
    from layerprune.data import load_text

    path = tmp_path_factory.mktemp("data") / "train.txt"
    path.write_text(load_text("fixture:train").text[:40_000])
    return str(path)


def few_examples(lm, source, n=8, seqlen=32):
    data = load_training_data(lm, source, seqlen)
    data.input_ids, data.labels = data.input_ids[:n], data.labels[:n]
    return data


def logits(lm, ids):
    with torch.no_grad():
        return lm.model(ids).logits


def mean_loss(lm, data):
    batch = data.batch(list(range(len(data))), 0)
    with torch.no_grad():
        return float(lm.model(**batch).loss)


def test_lora_with_zero_steps_then_merge_gives_the_same_logits(train_text):
    lm = fresh()
    ids = torch.randint(3, 8000, (2, 40), generator=torch.Generator().manual_seed(1))
    want = logits(lm, ids)
    record = recover(lm, few_examples(lm, train_text), steps=0, progress=False)
    assert record["steps"] == 0 and record["trainable_parameters"] > 0
    assert type(lm.model).__name__ == "LlamaForCausalLM"  # unwrapped: no peft layer left
    assert not any("lora" in name for name, _ in lm.model.named_parameters())
    torch.testing.assert_close(logits(lm, ids), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_few_steps_lower_the_training_loss(method, train_text):
    lm = fresh()
    data = few_examples(lm, train_text, n=8)
    before = mean_loss(lm, data)
    record = recover(lm, data, method=method, steps=6, lr=2e-3, progress=False, **SMALL)
    after = mean_loss(lm, data)
    assert after < before - 0.05, (before, after)
    assert record["tokens"] == 6 * 2 * 32  # every step saw batch_size full windows
    assert record["trainable_parameters"] < 600_000 if method == "lora" else 11_000_000


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["lora", "full"])
def test_sparsity_is_unchanged_after_training_and_merge(method, dtype, train_text):
    lm = fresh(dtype)
    lp.apply(lm, lp.plan(lm, sparsity=0.5, pruner="magnitude", progress=False), progress=False)
    names = lm.adapter.layer_names()
    zeros = {n: (lm.adapter.layer(n).weight == 0).clone() for n in names}
    weights = {n: lm.adapter.layer(n).weight.clone() for n in names}
    record = recover(
        lm, few_examples(lm, train_text), method=method, steps=3, lr=1e-3, progress=False, **SMALL
    )
    assert record["sparsity_kept"]
    changed = 0
    for n in names:
        w = lm.adapter.layer(n).weight
        assert torch.equal(w == 0, zeros[n]), n  # the same positions, no more, no fewer
        changed += int((w != weights[n]).sum())
    assert changed > 0.25 * sum(int((~z).sum()) for z in zeros.values())  # training moved the weights


def test_a_width_pruned_model_keeps_its_shapes_and_reloads(tmp_path, train_text):
    lm = fresh()
    scores = lp.score(lm, "magnitude-sp", progress=False)
    lp.apply(lm, lp.plan(lm, scores, width=0.3, allocation="alpha", progress=False), progress=False)
    shapes = {n: tuple(p.shape) for n, p in lm.model.named_parameters()}
    assert len({lm.adapter.mlp_channels(i) for i in range(12)}) > 1  # per-block shapes
    lp.export(lm, tmp_path / "width", None)
    lm = lp.load(str(tmp_path / "width"), device="cpu", quiet=True)
    recover(lm, few_examples(lm, train_text), steps=2, lr=1e-3, progress=False, **SMALL)
    assert {n: tuple(p.shape) for n, p in lm.model.named_parameters()} == shapes
    ids = torch.randint(3, 8000, (1, 24), generator=torch.Generator().manual_seed(2))
    lp.export(lm, tmp_path / "recovered", None)
    # exports keep the checkpoint's dtype (the fixture's bf16, stated in every config.json since):
    # the reload is the trained model with its weights rounded to it
    assert json.loads((tmp_path / "recovered" / "config.json").read_text())["dtype"] == "bfloat16"
    with torch.no_grad():
        for p in lm.model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    want = logits(lm, ids)
    again = lp.load(str(tmp_path / "recovered"), device="cpu", quiet=True)
    torch.testing.assert_close(logits(again, ids), want, atol=1e-5, rtol=1e-5)


def test_stopped_then_resumed_equals_an_uninterrupted_run(tmp_path, train_text):
    options = {"steps": 6, "lr": 1e-3, **SMALL}
    whole = fresh()
    recover(whole, few_examples(whole, train_text), progress=False, **options)
    part = fresh()
    ckpt = tmp_path / "ckpt"
    record = recover(
        part, few_examples(part, train_text), checkpoint_dir=ckpt, stop_after=3, progress=False, **options
    )
    assert record["steps"] == 3 and json.loads((ckpt / "state.json").read_text())["step"] == 2
    resumed = fresh()
    record = recover(
        resumed, few_examples(resumed, train_text), checkpoint_dir=ckpt, progress=False, **options
    )
    assert record["resumed_from_step"] == 2 and not ckpt.exists()
    for (name, a), (_, b) in zip(whole.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    other = fresh()
    recover(
        other, few_examples(other, train_text), checkpoint_dir=ckpt, stop_after=2, progress=False, **options
    )
    with pytest.raises(LayerpruneError, match="another recovery run"):
        recover(
            fresh(),
            few_examples(other, train_text),
            checkpoint_dir=ckpt,
            progress=False,
            **{**options, "lr": 5e-4},
        )


def _spawn(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "layerprune.cli", *map(str, args), "--quiet", "--no-plot"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_kill_9_during_recover_then_rerun_gives_the_uninterrupted_weights(tmp_path, train_text):
    args = ["recover", "fixture", "--data", train_text, "--steps", "24", "--seqlen", "32"]
    args += [
        "--batch-size",
        "2",
        "--warmup",
        "0",
        "--lr",
        "1e-3",
        "--save-every",
        "3",
        "--eval",
        "fixture:test",
    ]
    args += ["--eval-windows", "1"]
    whole = _spawn(*args, "-o", tmp_path / "whole")
    assert whole.wait(timeout=600) == 0, whole.stderr.read()
    out = tmp_path / "killed"
    ckpt = tmp_path / ".killed.recover" / "state.json"
    proc = _spawn(*args, "-o", out)
    t0 = time.time()
    while time.time() - t0 < 300 and proc.poll() is None:
        if ckpt.exists() and json.loads(ckpt.read_text())["step"] >= 6:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    rerun = _spawn(*args, "-o", out)
    assert rerun.wait(timeout=600) == 0, rerun.stderr.read()
    report = json.loads((out / "report.json").read_text())
    assert report["recovery"]["resumed_from_step"] >= 6
    a, b = load_file(str(tmp_path / "whole" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:  # the checkpoint is bf16, like the fixture: equal up to the last bit of rounding
        torch.testing.assert_close(a[k].float(), b[k].float(), atol=1e-2, rtol=1e-2, msg=k)
    assert sum(int((a[k] != b[k]).sum()) for k in a) < 1e-3 * sum(v.numel() for v in a.values())
    assert not (tmp_path / ".killed.recover").exists()


def test_alpaca_examples_train_on_the_response_only(tmp_path):
    lm = fresh()
    tok = lm.tokenizer
    rows = [
        {"instruction": "Name the first book.", "input": "", "output": "Genesis."},
        {"instruction": "Complete the verse.", "input": "In the beginning", "output": "God created."},
    ]
    path = tmp_path / "alpaca.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = training_data(tok, str(path), 256)
    assert data.protocol["format"] == "alpaca" and len(data) == 2
    prompt = tok(PROMPT_NO_INPUT.format(instruction=rows[0]["instruction"]))["input_ids"]
    response = tok(rows[0]["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert data.input_ids[0].tolist() == prompt + response
    assert data.labels[0].tolist() == [IGNORE] * len(prompt) + response
    batch = data.batch([0, 1], pad_id=0)
    assert int((batch["labels"] != IGNORE).sum()) == len(response) + int((data.labels[1] != IGNORE).sum())
    assert batch["attention_mask"].sum(1).tolist() == [len(data.input_ids[0]), len(data.input_ids[1])]


def test_recover_cli_writes_a_merged_checkpoint_with_its_record(tmp_path, cli, train_text):
    r = cli(
        "recover", "fixture", "--data", train_text, "--steps", "2", "--seqlen", "32", "--batch-size", "2",
        "--eval", "fixture:test", "--eval-windows", "2", "--eval-seqlen", "64", "-o", tmp_path / "out", "--quiet",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert not any("lora" in n for n in model.state_dict())
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    rec = report["recovery"]
    assert rec["method"] == "lora" and rec["steps"] == 2 and rec["tokens"] == 2 * 2 * 32
    assert rec["perplexity_before"][0]["protocol"]["dataset"] == "fixture:test"
    assert rec["precision"] == {"dtype": "float32", "mode": "fp32", "skipped_steps": []}
    assert report["evaluation"] == rec["perplexity_after"]
    loss = json.loads((tmp_path / "out" / "loss.json").read_text())
    assert loss["step"] == [1, 2] and len(loss["loss"]) == 2 and (tmp_path / "out" / "loss.png").exists()
    assert RecoveryConfig().rank == 8 and RecoveryConfig().alpha == 16 and RecoveryConfig().lr == 1e-4


# ---- precision ------------------------------------------------------------------------------------
def changed_weights(before: dict, lm, dtype=None) -> int:
    """Weights whose value differs from before training, each tensor compared element by element
    (after rounding both to `dtype` when given)."""
    n = 0
    for name, p in lm.model.named_parameters():
        a, b = before[name], p.detach()
        if dtype is not None:
            a, b = a.to(dtype), b.to(dtype)
        n += int((a != b).sum())
    return n


def snapshot(lm) -> dict:
    return {n: p.detach().clone() for n, p in lm.model.named_parameters()}


def test_bf16_full_recovery_changes_as_many_weights_as_fp32(train_text):
    """Without fp32 master weights each bf16 AdamW update under half a unit in the last place is
    lost: the old code changed 0.82 x fp32's count here, and 0.90 x of the weights whose fp32-trained
    value rounds to another bf16 number (what bf16 can show at all)."""
    options = {"method": "full", "steps": 10, "lr": 2e-4, "progress": False, **SMALL}
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        lm = fresh(dtype)
        before = snapshot(lm)
        record = recover(lm, few_examples(lm, train_text), **options)
        runs[dtype] = (before, lm, record)
    before32, lm32, _ = runs[torch.float32]
    before16, lm16, record = runs[torch.bfloat16]
    n32, n16 = changed_weights(before32, lm32), changed_weights(before16, lm16)
    assert n16 >= 0.9 * n32, (n16, n32)
    assert n16 >= 0.99 * changed_weights(before32, lm32, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in lm16.model.parameters())  # the model keeps its dtype
    assert record["precision"] == {"dtype": "bfloat16", "mode": "master", "skipped_steps": []}


def test_fp16_full_recovery_never_yields_a_non_finite_weight(train_text):
    """fp16 AdamW state underflows (eps 1e-8 is 0 in fp16): the old code ended in NaN weights."""
    lm = fresh(torch.float16)
    data = few_examples(lm, train_text)
    loss = mean_loss(lm, data)
    before = snapshot(lm)
    record = recover(lm, data, method="full", steps=6, lr=1e-3, progress=False, **SMALL)
    assert all(p.dtype == torch.float16 and bool(torch.isfinite(p).all()) for p in lm.model.parameters())
    assert changed_weights(before, lm) > 0.9 * sum(p.numel() for p in before.values())
    assert mean_loss(lm, data) < loss - 0.05
    assert record["precision"]["mode"] == "master" and record["precision"]["loss_scale"] > 0


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_non_finite_loss_stops_the_run_in_one_line_and_writes_nothing(method, tmp_path, cli, train_text):
    lm = fresh()
    with torch.no_grad():
        lm.adapter.blocks[5].mlp.down_proj.weight[3, 7] = float("nan")  # a poisoned weight
    lm.modified()
    ckpt = tmp_path / "ckpt"
    with pytest.raises(LayerpruneError, match="non-finite for 3 steps in a row") as e:
        recover(lm, few_examples(lm, train_text), method=method, steps=8, checkpoint_dir=ckpt, progress=False,
                **{**SMALL, "save_every": 1})  # fmt: skip
    assert "\n" not in str(e.value) and not ckpt.exists()
    if method == "lora":
        return
    lp.export(lm, tmp_path / "poisoned", None)
    out = tmp_path / "out"
    r = cli(
        "recover", tmp_path / "poisoned", "--data", train_text, "--full", "--steps", "8", "--seqlen", "32",
        "--batch-size", "2", "--save-every", "1", "-o", out, "--quiet", "--no-plot",
    )  # fmt: skip
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "non-finite" in r.stderr
    assert not out.exists() and not (tmp_path / ".out.recover").exists()


_SAVE_AS_CUDA: list[bool] = []


def _as_cuda(storage):
    return "cuda:0" if _SAVE_AS_CUDA else None  # None: torch's own taggers decide


torch.serialization.register_package(0, _as_cuda, lambda storage, location: None)


def as_if_from_a_gpu(ckpt) -> None:
    """Rewrite a checkpoint as a CUDA run writes it: optimizer tensors tagged cuda:0 (what loads
    only with map_location on a host without CUDA), a CUDA generator state beside the CPU one."""
    from safetensors.torch import save_file

    opt = torch.load(ckpt / "optimizer.pt", weights_only=True)
    _SAVE_AS_CUDA.append(True)
    try:
        torch.save(opt, ckpt / "optimizer.pt")
    finally:
        _SAVE_AS_CUDA.clear()
    rng = load_file(str(ckpt / "rng.safetensors"))
    save_file({**rng, "cuda:0": torch.arange(16, dtype=torch.uint8)}, str(ckpt / "rng.safetensors"))
    state = json.loads((ckpt / "state.json").read_text())
    (ckpt / "state.json").write_text(json.dumps({**state, "device": "cuda:0"}))
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(ckpt / "optimizer.pt", weights_only=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_resume_is_bit_identical_from_a_gpu_checkpoint_and_kept_from_fp32(
    dtype, tmp_path, train_text
):
    """Full training in bf16 (fp32 masters) and fp16 (masters and a loss scaler): stopped at step 3
    (checkpoint at 2, rewritten as if a GPU had written it), resumed: every weight bit-identical to
    an uninterrupted run. A float32 run with the same options refuses that checkpoint."""
    options = {"method": "full", "steps": 5, "lr": 1e-3, "progress": False, **SMALL}
    whole = fresh(dtype)
    recover(whole, few_examples(whole, train_text), **options)
    ckpt = tmp_path / "ckpt"
    part = fresh(dtype)
    recover(part, few_examples(part, train_text), checkpoint_dir=ckpt, stop_after=3, **options)
    as_if_from_a_gpu(ckpt)
    with pytest.raises(LayerpruneError, match="another recovery run .*dtype"):
        recover(fresh(), few_examples(part, train_text), checkpoint_dir=ckpt, **options)
    resumed = fresh(dtype)
    record = recover(resumed, few_examples(resumed, train_text), checkpoint_dir=ckpt, **options)
    assert record["resumed_from_step"] == 2 and record["resumed_from_device"] == "cuda:0"
    assert not ckpt.exists()
    for (name, a), (_, b) in zip(whole.model.named_parameters(), resumed.model.named_parameters()):
        assert a.dtype == b.dtype == dtype and torch.equal(a, b), name
