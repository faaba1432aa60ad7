"""Models larger than memory: a tiny Llama saved in 3 shards, loaded whole and with its blocks
offloaded, must give the same fingerprint, scores, pruned weights and exported shards."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import layerprune as lp
from layerprune.data import Windows
from layerprune.models.offload import parse_size, write_safetensors
from layerprune.models.tiny import tiny_model

FIXTURE = Path(lp.__file__).parent / "models" / "fixture"


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> tuple[Path, int]:
    torch.manual_seed(0)
    model = tiny_model("llama", num_layers=4)
    total = sum(p.numel() * 4 for p in model.parameters())
    folder = tmp_path_factory.mktemp("offload") / "tiny"
    model.save_pretrained(folder, max_shard_size=int(total / 2.5))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(FIXTURE / f, folder / f)
    assert len(list(folder.glob("model-*.safetensors"))) == 3
    return folder, total


def windows(n=6, seqlen=16):
    ids = torch.randint(3, 128, (n, seqlen), generator=torch.Generator().manual_seed(0))
    return Windows(ids, {"dataset": "random", "samples": n, "seqlen": seqlen, "seed": 0, "bos": "none",
                         "fingerprint": f"random-{n}-{seqlen}"})  # fmt: skip


def both(sharded):
    folder, total = sharded
    whole = lp.load(str(folder), device="cpu", quiet=True)
    off = lp.load(str(folder), device="cpu", quiet=True, max_memory=int(total * 0.6))
    assert not whole.offloaded and off.offloaded
    return whole, off


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_offloaded_blocks_live_on_meta_and_the_fingerprint_matches(sharded):
    whole, off = both(sharded)
    assert all(p.device.type == "meta" for p in off.adapter.blocks.parameters())
    assert off.model.get_input_embeddings().weight.device.type == "cpu"
    assert off.fingerprint == whole.fingerprint  # computed from the shards, one tensor at a time


@pytest.mark.parametrize("method", ["ppl", "shapley", "bi", "angular", "sleb", "owl"])
def test_block_walking_scores_equal_the_in_memory_ones(sharded, method):
    whole, off = both(sharded)
    w = windows()
    options = {"budget": 8} if method == "shapley" else {}
    a = lp.score(whole, method, w, progress=False, **options)
    b = lp.score(off, method, w, progress=False, **options)
    assert a.importance == b.importance


@pytest.mark.parametrize(
    "unit,removed", [("block", None), ("module", None), ("block", [2]), ("module", [1, 4])]
)
def test_taylor_block_by_block_backward_equals_one_backward_of_the_whole_model(sharded, unit, removed):
    from layerprune.scorers.taylor import score

    whole, off = both(sharded)
    w = windows()
    n = len(whole.adapter.units(unit))
    mask = None if removed is None else [j in removed for j in range(n)]
    a = score(whole.model, whole.adapter, w, unit=unit, removed=mask).importance
    b = score(off.model, off.adapter, w, unit=unit, removed=mask).importance
    assert [v is None for v in a] == [v is None for v in b] == [bool(mask and mask[j]) for j in range(n)]
    assert [v for v in b if v is not None] == pytest.approx([v for v in a if v is not None], rel=1e-5)


@pytest.mark.parametrize("start", [2.0**16, 2.0**40])
def test_fp16_taylor_block_by_block_with_loss_scaling_equals_the_in_memory_one(sharded, start, monkeypatch):
    """fp16 with its loss scaled; from 2^40 the scaled gradients overflow and each path backs off
    (the offloaded one block by block). Both equal fp32's scores within 4 fp16 unit roundoffs."""
    from layerprune.scorers import taylor

    folder, total = sharded
    w = windows()
    fp32 = lp.load(str(folder), device="cpu", quiet=True)
    want = taylor.score(fp32.model, fp32.adapter, w).importance
    monkeypatch.setattr(taylor, "FP16_LOSS_SCALE", start)
    whole = lp.load(str(folder), device="cpu", quiet=True, dtype=torch.float16)
    off = lp.load(str(folder), device="cpu", quiet=True, dtype=torch.float16, max_memory=int(total * 0.3))
    a, b = taylor.score(whole.model, whole.adapter, w), taylor.score(off.model, off.adapter, w)
    assert off.offloaded and next(whole.model.parameters()).dtype == torch.float16
    assert b.importance == pytest.approx(a.importance, rel=1e-6)
    assert a.importance == pytest.approx(want, rel=4 * 2.0**-11)
    assert a.extra["loss_scale"] == b.extra["loss_scale"] <= min(start, 2.0**16)


def test_esd_metrics_equal_the_in_memory_ones(sharded):
    whole, off = both(sharded)
    a = lp.score(whole, "alpha", progress=False)
    b = lp.score(off, "alpha", progress=False)
    assert a.importance == b.importance and a.extra == b.extra


@pytest.mark.parametrize("pruner", ["wanda", "sparsegpt", "magnitude"])
def test_pruning_offloaded_gives_the_same_weights_and_shards_like_the_input(sharded, tmp_path, pruner):
    folder, _ = sharded
    whole, off = both(sharded)
    w = windows()
    plan = lp.plan(whole, sparsity=0.5, pruner=pruner, calib=w, progress=False)
    calib = None if pruner == "magnitude" else w
    # at most one block is resident at any moment
    seen: list[int] = []
    enter = off.adapter.offload.resident

    def watched(i, modifies=False):
        resident = [
            j
            for j, blk in enumerate(off.adapter.blocks)
            if any(p.device.type != "meta" for p in blk.parameters())
        ]
        seen.append(len(resident))
        return enter(i, modifies)

    off.adapter.offload.resident = watched
    assert lp.apply(whole, plan, calib, progress=False) == lp.apply(off, plan, calib, progress=False)
    assert max(seen) == 0 and all(p.device.type == "meta" for p in off.adapter.blocks.parameters())
    assert off.fingerprint == whole.fingerprint
    a = lp.export(whole, tmp_path / "whole", plan)
    b = lp.export(off, tmp_path / "off", plan)
    x, y = tensors(a), tensors(b)
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    # the same shard files holding the same tensors as the input
    index_in = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    index_out = json.loads((b / "model.safetensors.index.json").read_text())["weight_map"]
    assert index_out == index_in
    for name, file in index_out.items():
        with safe_open(str(b / file), framework="pt") as f:
            assert name in f.keys()  # noqa: SIM118
    # plain transformers reloads it, and it is the model pruned in memory
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(b)
    for k, v in whole.model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[k], v), k
    # the input shards were not touched
    before = tensors(folder)
    assert any(not torch.equal(before[k], y[k]) for k in y)


@pytest.mark.parametrize("allocation", ["uniform", "owl"])
def test_width_pruning_offloaded_writes_the_same_smaller_checkpoint(sharded, tmp_path, allocation):
    whole, off = both(sharded)
    w = windows()
    scores = lp.score(whole, "wanda-sp", w, progress=False)
    assert lp.score(off, "wanda-sp", w, progress=False).extra == scores.extra
    plan = lp.plan(whole, scores, width=0.4, allocation=allocation, calib=w, progress=False)
    a = lp.apply(whole, plan, w, progress=False)
    b = lp.apply(off, plan, w, progress=False)
    assert a == b and b["parameters_after"] < b["parameters_before"]
    assert all(p.device.type == "meta" for p in off.adapter.blocks.parameters())
    x = tensors(lp.export(whole, tmp_path / "whole", plan))
    y = tensors(lp.export(off, tmp_path / "off", plan))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    cw, co = (json.loads((tmp_path / f / "config.json").read_text()) for f in ("whole", "off"))
    assert {k: v for k, v in cw.items() if k != "transformers_version"} == {
        k: v for k, v in co.items() if k != "transformers_version"
    }
    reloaded = lp.load(str(tmp_path / "off"), device="cpu", quiet=True)  # per-block shapes included
    assert reloaded.fingerprint == whole.fingerprint


@pytest.mark.parametrize("unit,remove", [("block", 2), ("module", 3)])
def test_depth_pruning_offloaded_writes_the_same_renumbered_checkpoint(sharded, tmp_path, unit, remove):
    whole, off = both(sharded)
    w = windows()
    scores = lp.score(whole, "ppl", w, unit=unit, progress=False)
    plan = lp.plan(whole, scores, remove=remove)
    assert lp.apply(whole, plan) == lp.apply(off, plan)
    assert off.adapter.num_blocks == whole.adapter.num_blocks and off.fingerprint == whole.fingerprint
    x = tensors(lp.export(whole, tmp_path / "whole", plan))
    y = tensors(lp.export(off, tmp_path / "off", plan))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    # reloaded offloaded again (removed parts silenced), it computes what the model pruned in memory does
    again = lp.load(str(tmp_path / "off"), device="cpu", quiet=True, max_memory=int(sharded[1] * 0.5))
    reference = lp.load(str(tmp_path / "whole"), device="cpu", quiet=True)
    assert again.offloaded and again.fingerprint == reference.fingerprint


def test_perplexity_of_an_offloaded_model_matches_a_full_forward(sharded):
    from layerprune.evaluation.perplexity import perplexity_of_windows

    whole, off = both(sharded)
    w = windows()
    a = perplexity_of_windows(whole.model, whole.adapter, w, progress=False)
    b = perplexity_of_windows(off.model, off.adapter, w, progress=False)
    assert b.nll == pytest.approx(a.nll, rel=1e-6)  # fused float64 head vs float32 log-softmax


def test_streamed_safetensors_read_back_like_safetensors_own_files(tmp_path):
    g = torch.Generator().manual_seed(0)
    ts = {
        "a": torch.randn(3, 5, generator=g),
        "b.c": torch.randn(7, generator=g),
        "z": torch.randn(2, 2, 2, generator=g),
    }
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        names = ["z", "a", "b.c"]
        write_safetensors(
            tmp_path / "ours.safetensors", names, {k: v.shape for k, v in ts.items()}, dtype, ts.get
        )
        save_file({k: v.to(dtype) for k, v in ts.items()}, str(tmp_path / "theirs.safetensors"))
        ours, theirs = load_file(tmp_path / "ours.safetensors"), load_file(tmp_path / "theirs.safetensors")
        assert ours.keys() == theirs.keys()
        assert all(ours[k].dtype == dtype and torch.equal(ours[k], theirs[k]) for k in ours)


def test_max_memory_errors_name_the_fix(sharded):
    folder, total = sharded
    with pytest.raises(
        lp.LayerpruneError, match=r"cannot hold one block \(37\.12 KB\).*raise it to at least"
    ):
        lp.load(str(folder), quiet=True, max_memory=20_000)
    with pytest.raises(lp.LayerpruneError, match="is not a size; write it like 8GB"):
        parse_size("lots")
    assert parse_size("1.5GB") == 1_500_000_000 and parse_size("1KiB") == 1024
    assert not lp.load(str(folder), quiet=True, max_memory=total).offloaded  # fits: loaded whole


def test_paths_that_need_the_whole_model_refuse_an_offloaded_one(sharded):
    _, off = both(sharded)
    w = windows()
    from layerprune.evaluation.zeroshot import zeroshot

    with pytest.raises(
        lp.LayerpruneError, match="zero-shot evaluation .* needs the whole model in memory; load"
    ):
        zeroshot(off, "fixture", limit=2)
    with pytest.raises(lp.LayerpruneError, match="Taylor scores all calibration samples as one batch"):
        lp.score(off, "taylor", w, batch_size=2, progress=False)
    with pytest.raises(lp.LayerpruneError, match="recovery training needs the whole model"):
        lp.recover(off, "fixture:train", steps=1)


def test_cli_apply_with_max_memory(sharded, tmp_path, cli):
    folder, total = sharded
    r = cli("plan", folder, "--sparsity", "0.5", "--pruner", "magnitude", "-o", tmp_path / "p.json", "--no-plot",
            "--quiet", "--max-memory", str(int(total * 0.6)))  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = cli(
        "apply", tmp_path / "p.json", "-o", tmp_path / "out", "--quiet", "--max-memory", str(int(total * 0.6))
    )
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) == 3
    r = cli("apply", tmp_path / "p.json", "-o", tmp_path / "o2", "--max-memory", "10KB")
    assert r.returncode == 2 and "raise it to at least" in r.stderr and "\n" not in r.stderr.strip()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_offloaded_blocks_on_the_gpu_match_the_cpu(sharded):
    folder, total = sharded
    w = windows()
    cpu = lp.load(str(folder), device="cpu", quiet=True, max_memory=int(total * 0.6))
    gpu = lp.load(str(folder), device="cuda", dtype=torch.float32, quiet=True, max_memory=int(total * 0.6))
    a = lp.score(cpu, "ppl", w, progress=False)
    b = lp.score(gpu, "ppl", w, progress=False)
    assert b.importance == pytest.approx(a.importance, rel=1e-4)
