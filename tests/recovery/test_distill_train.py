"""Recovery by distillation end to end: resumable, equal live and cached at k = vocabulary, a sparse
student's zeros kept, and bad teachers and caches refused before any work."""

from __future__ import annotations

import json

import pytest
import torch

import layerprune as lp
from layerprune.errors import LayerpruneError
from layerprune.recovery import load_training_data, recover

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"batch_size": 2, "warmup": 0, "save_every": 2, "lr": 1e-3}


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    from layerprune.data import load_text

    path = tmp_path_factory.mktemp("kd") / "train.txt"
    path.write_text(load_text("fixture:train").text[:6_000])
    return str(path)


@pytest.fixture(scope="module")
def teacher():
    return lp.load("fixture", dtype="float32", quiet=True)


def student():
    """The fixture pruned to 50 % by magnitude (data-free): a student that differs from its teacher."""
    lm = lp.load("fixture", dtype="float32", quiet=True)
    lp.apply(lm, lp.plan(lm, sparsity=0.5, pruner="magnitude", progress=False), progress=False)
    return lm


def examples(lm, text, n=8, seqlen=32):
    data = load_training_data(lm, text, seqlen)
    data.input_ids, data.labels = data.input_ids[:n], data.labels[:n]
    data.protocol = {**data.protocol, "examples": n}
    return data


def weights(lm):
    return {n: p.detach().clone() for n, p in lm.model.named_parameters()}


@pytest.mark.parametrize("method,cached", [("full", False), ("full", True), ("lora", True)])
def test_kd_stopped_then_resumed_equals_an_uninterrupted_run(tmp_path, text, teacher, method, cached):
    options = {"method": method, "steps": 5, **SMALL}
    cache = {"teacher_cache": tmp_path / "cache", "kd_topk": 16} if cached else {}
    whole = student()
    record = recover(whole, examples(whole, text), teacher=teacher, progress=False, **cache, **options)
    assert len(record["history"]["kd"]) == 5 and record["distillation"]["teacher"] == "fixture"
    part = student()
    ckpt = tmp_path / "ckpt"
    recover(part, examples(part, text), teacher=teacher, checkpoint_dir=ckpt, stop_after=3, progress=False,
            **cache, **options)  # fmt: skip
    resumed = student()
    record = recover(resumed, examples(resumed, text), teacher=teacher, checkpoint_dir=ckpt, progress=False,
                     **cache, **options)  # fmt: skip
    assert record["resumed_from_step"] == 2
    a, b = weights(whole), weights(resumed)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5, msg=name)


def test_cached_at_the_vocabulary_size_trains_as_the_live_teacher(tmp_path, text, teacher):
    """With k = V the cache holds the whole distribution: the same loss, so the same weights."""
    V = teacher.model.config.vocab_size
    options = {"method": "full", "steps": 3, **SMALL}
    live, cached = student(), student()
    r1 = recover(live, examples(live, text, n=4), teacher=teacher, progress=False, **options)
    r2 = recover(cached, examples(cached, text, n=4), teacher=teacher, teacher_cache=tmp_path / "c",
                 kd_topk=V, progress=False, **options)  # fmt: skip
    assert r2["history"]["kd"] == pytest.approx(r1["history"]["kd"], rel=1e-4)
    a, b = weights(live), weights(cached)
    # AdamW moves each weight by about lr (1e-3) a step whatever its gradient's size: where a gradient is
    # near 0, the two computations' rounding (the live KL and the cached one sum q in another order) shows
    # up as a few % of one step (seen: 2.8e-5); a wrong loss moves weights by whole steps
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-4, rtol=1e-4, msg=name)


def test_a_sparse_student_keeps_exactly_its_zeros(text, teacher):
    lm = student()
    zeros = {n: p == 0 for n, p in lm.model.named_parameters() if p.dim() == 2 and "layers" in n}
    recover(lm, examples(lm, text), teacher=teacher, method="full", steps=3, progress=False, **SMALL)
    moved = 0
    for n, p in lm.model.named_parameters():
        if n in zeros:
            assert torch.equal(p == 0, zeros[n]), n
            moved += int((p != 0).sum())
    assert moved > 0


def test_bad_teachers_and_caches_are_one_line_before_training(tmp_path, text, teacher):
    lm = student()
    data = examples(lm, text)
    with pytest.raises(LayerpruneError, match="the teacher is the student itself"):
        recover(lm, data, teacher=lm, steps=1, progress=False)
    from layerprune.models.loading import LoadedModel, ModelAdapter
    from layerprune.models.tiny import tiny_model

    tiny = tiny_model("llama")
    other = LoadedModel("tiny", tiny, teacher.tokenizer, ModelAdapter(tiny), None)
    with pytest.raises(LayerpruneError, match="vocabulary of 128 tokens"):
        recover(lm, data, teacher=other, steps=1, progress=False)
    recover(
        student(), data, teacher=teacher, teacher_cache=tmp_path / "c", kd_topk=8, steps=1, progress=False
    )
    with pytest.raises(LayerpruneError, match="made for another run: .*seqlen 32 \\(not 48\\)"):
        recover(
            lm,
            examples(lm, text, seqlen=48),
            teacher_cache=tmp_path / "c",
            kd_topk=8,
            steps=1,
            progress=False,
        )
    with pytest.raises(LayerpruneError, match="k 8 \\(not 4\\)"):
        recover(lm, data, teacher_cache=tmp_path / "c", kd_topk=4, steps=1, progress=False)
    with pytest.raises(LayerpruneError, match="made for another teacher"):
        recover(lm, data, teacher=student(), teacher_cache=tmp_path / "c", kd_topk=8, steps=1, progress=False)


def test_recover_cli_with_a_teacher_names_it_everywhere(tmp_path, cli, text):
    r = cli("recover", "fixture", "--data", text, "--teacher", tmp_path / "nowhere", "-o", tmp_path / "x")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "does not exist" in r.stderr
    assert not (tmp_path / "x").exists()
    r = cli("recover", "fixture", "--data", text, "--kd-mix", "0.5", "-o", tmp_path / "x")
    assert r.returncode == 2 and "need --teacher" in r.stderr
    r = cli("recover", "fixture", "--data", text, "--teacher", "fixture", "--full", "--steps", "2", "--seqlen", "32",
            "--batch-size", "2", "--warmup", "0", "--kd-mix", "0.25", "--kd-temperature", "2", "--eval-windows", "1",
            "--eval", "fixture:test", "-o", tmp_path / "out", "--quiet", "--dtype", "float32")  # fmt: skip
    assert r.returncode == 2 and "the teacher is the student itself" in r.stderr


def test_recover_cli_distils_from_a_cache_and_records_the_teacher(tmp_path, cli, text):
    lm = student()
    lp.export(lm, tmp_path / "student", None)
    args = ("recover", tmp_path / "student", "--data", text, "--teacher", "fixture", "--teacher-cache",
            tmp_path / "cache", "--kd-topk", "8", "--full", "--steps", "2", "--seqlen", "32", "--batch-size", "2",
            "--warmup", "0", "--kd-mix", "0.25", "--eval", "fixture:test", "--eval-windows", "1", "--quiet")  # fmt: skip
    r = cli(*args, "-o", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    rec = json.loads((tmp_path / "out" / "report.json").read_text())["recovery"]
    kd = rec["distillation"]
    assert kd["teacher"] == "fixture" and kd["topk"] == 8 and kd["mix"] == 0.25
    assert kd["cache"] == str(tmp_path / "cache")
    history = json.loads((tmp_path / "out" / "loss.json").read_text())
    for k in range(2):  # the logged loss is its two logged parts, mixed
        assert history["loss"][k] == pytest.approx(
            0.75 * history["kd"][k] + 0.25 * history["lm"][k], rel=1e-5
        )
    assert "Distilled from `fixture`" in (tmp_path / "out" / "README.md").read_text()
    # a second student of the sweep reuses the cache without its teacher
    r = cli(*[a for a in args if a not in ("--teacher", "fixture")], "-o", tmp_path / "out2")
    assert r.returncode == 0, r.stderr


def test_a_cache_holds_only_the_windows_training_uses(tmp_path, text, teacher):
    """A short run over a long text caches the teacher on the windows it trains on, not all of them:
    their rows are the teacher's own top-k (float64 by hand), a run that stays within them reuses the
    cache, and one that needs more windows is one line."""
    from safetensors.torch import load_file

    lm = student()
    data = examples(lm, text, n=16)
    options = {"method": "full", "batch_size": 2, "warmup": 0, "lr": 1e-3, "progress": False}
    recover(lm, data, teacher=teacher, teacher_cache=tmp_path / "c", kd_topk=4, steps=3, **options)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    cached = manifest["cached"]
    assert manifest["examples"] == 16 and len(cached) == 6 == len(set(cached))  # 3 steps x 2, of 16
    rows = load_file(str(tmp_path / "c" / "shard-00000.safetensors"))
    assert rows["index"].shape[0] == 6
    pad = teacher.tokenizer.pad_token_id or teacher.tokenizer.eos_token_id or 0
    batch = data.batch(cached, pad)
    with torch.no_grad():
        logits = teacher.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logq = torch.log_softmax(logits.double(), dim=-1)
    for r in range(len(cached)):
        width = int(batch["attention_mask"][r].sum())
        want = logq[r, :width].topk(4, dim=-1)
        torch.testing.assert_close(rows["logq"][r, :width].double(), want.values, atol=1e-5, rtol=1e-5)
        rest = torch.logsumexp(logq[r, :width].scatter(-1, want.indices, float("-inf")), dim=-1)
        torch.testing.assert_close(rows["rest"][r, :width].double(), rest, atol=1e-5, rtol=1e-5)
    # a shorter run of the same sweep trains from it without a teacher; a longer one needs more windows
    recover(student(), data, teacher_cache=tmp_path / "c", kd_topk=4, steps=2, **options)
    with pytest.raises(LayerpruneError, match="not 4 of the 10 this run uses"):
        recover(student(), data, teacher_cache=tmp_path / "c", kd_topk=4, steps=5, **options)
