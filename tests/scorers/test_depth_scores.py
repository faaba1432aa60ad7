"""Each depth scorer against an independent computation on tiny models."""

import copy
import math

import pytest
import torch

from layerprune.data import Windows
from layerprune.errors import LayerpruneError
from layerprune.models.adapter import ModelAdapter, Unit
from layerprune.models.tiny import tiny_model
from layerprune.scorers import scorer


def windows(n=4, t=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Windows(torch.randint(3, 128, (n, t), generator=g), {"fingerprint": f"test{seed}"})


def hf_ppl(model, ids):
    """Perplexity with HF's own loss on each window (all windows have the same length)."""
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in ids]
    return math.exp(sum(losses) / len(losses))


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_ppl_scores_equal_deleted_block_models(arch):
    model = tiny_model(arch, num_layers=5)
    w = windows()
    result = scorer("ppl")(model, ModelAdapter(model), w, progress=False)
    for i in range(5):
        pruned = copy.deepcopy(model)
        ModelAdapter(pruned).remove_blocks([i])
        assert result.importance[i] == pytest.approx(hf_ppl(pruned, w.input_ids), rel=1e-5)
    assert result.extra["calibration_ppl"] == pytest.approx(hf_ppl(model, w.input_ids), rel=1e-5)


def test_ppl_module_scores_and_removed_units():
    model = tiny_model("qwen3", num_layers=3)
    adapter = ModelAdapter(model)
    w = windows()
    removed = [False, False, True, False, False, False]  # 1.attn already gone
    result = scorer("ppl")(model, adapter, w, unit="module", removed=removed, progress=False)
    assert result.importance[2] is None
    for j in (0, 1, 3, 4, 5):
        mask = [not r for r in removed]
        mask[j] = False
        with adapter.skip(mask, "module"):
            assert result.importance[j] == pytest.approx(hf_ppl(model, w.input_ids), rel=1e-5)


def brute_force_taylor(model, ids, batch_size, per_block):
    """Reference semantics: grads of every parameter accumulated over batches, then |W * G| summed."""
    model.zero_grad()
    for p in model.parameters():
        p.requires_grad_(True)
    for b in ids.split(batch_size):
        model(input_ids=b, labels=b).loss.backward()
    scores = []
    for names in per_block:
        total = 0.0
        for name, p in model.named_parameters():
            if name in names and name.endswith("weight"):
                total += float((p.detach() * p.grad).abs().sum())
        scores.append(total)
    model.zero_grad()
    return scores


@pytest.mark.parametrize("batch_size", [None, 2])
def test_taylor_equals_brute_force_from_grad(batch_size):
    model = tiny_model("llama", num_layers=4)
    adapter = ModelAdapter(model)
    w = windows(n=4)
    result = scorer("taylor")(model, adapter, w, batch_size=batch_size, progress=False)
    per_block = [{f"model.layers.{i}.{n}" for n, _ in adapter.unit_parameters(Unit(i))} for i in range(4)]
    expected = brute_force_taylor(copy.deepcopy(model), w.input_ids, batch_size or 4, per_block)
    assert result.importance == pytest.approx(expected, rel=1e-4)
    assert all(p.grad is None for p in model.parameters()), "gradients must be freed"
    assert all(p.requires_grad for p in model.parameters()), "requires_grad must be restored"


def test_taylor_module_parts_sum_to_block():
    model = tiny_model("gemma2", num_layers=3)
    adapter = ModelAdapter(model)
    w = windows()
    blocks = scorer("taylor")(model, adapter, w, progress=False).importance
    parts = scorer("taylor")(model, adapter, w, unit="module", progress=False).importance
    for i in range(3):
        assert parts[2 * i] + parts[2 * i + 1] == pytest.approx(blocks[i], rel=1e-6)


def hand_run_llama_states(model, ids):
    """Hidden states entering each block and leaving the last one, by calling Llama's modules."""
    m = model.model
    h = m.embed_tokens(ids)
    pos = torch.arange(ids.shape[1])[None]
    emb = m.rotary_emb(h, position_ids=pos)
    states = [h]
    with torch.no_grad():
        for layer in m.layers:
            h = layer(h, attention_mask=None, position_embeddings=emb, position_ids=pos)
            states.append(h)
    return states


def test_bi_matches_hand_run_cosines():
    model = tiny_model("llama", num_layers=4)
    w = windows()
    result = scorer("bi")(model, ModelAdapter(model), w, progress=False)
    states = hand_run_llama_states(model, w.input_ids)
    for i in range(4):
        cos = torch.nn.functional.cosine_similarity(states[i], states[i + 1], dim=-1)
        assert result.importance[i] == pytest.approx(1 - cos.mean().item(), rel=1e-5)


def test_angular_matches_hand_run_last_token():
    model = tiny_model("llama", num_layers=4)
    w = windows()
    result = scorer("angular")(model, ModelAdapter(model), w, progress=False)
    states = hand_run_llama_states(model, w.input_ids)
    for n in (1, 2, 3):
        for start in range(4 - n + 1):
            a, b = states[start][:, -1], states[start + n][:, -1]
            cos = torch.nn.functional.cosine_similarity(a, b, dim=-1).clamp(-1, 1)
            expected = (torch.arccos(cos) / math.pi).mean().item()
            assert result.extra["spans"][str(n)][start] == pytest.approx(expected, abs=1e-5)
    assert result.importance == result.extra["spans"]["1"]


def test_sleb_equals_brute_force_greedy():
    model = tiny_model("mistral", num_layers=6)
    adapter = ModelAdapter(model)
    w = windows()
    result = scorer("sleb")(model, adapter, w, protect=[0, 5], steps=3, progress=False)
    keep, order = [True] * 6, []
    for _ in range(3):
        best = None
        for j in [j for j in range(1, 5) if keep[j]]:
            mask = list(keep)
            mask[j] = False
            with adapter.skip(mask):
                p = hf_ppl(model, w.input_ids)
            if best is None or p < best[0]:
                best = (p, j)
        keep[best[1]] = False
        order.append(best[1])
    assert result.extra["order"] == order
    assert sorted(range(6), key=lambda j: result.importance[j])[:3] == order
    assert result.importance[0] == result.importance[5] == 4.0


def test_scorer_errors():
    model = tiny_model("llama", num_layers=3)
    adapter = ModelAdapter(model)
    with pytest.raises(LayerpruneError, match="unknown scoring method 'magic'"):
        scorer("magic")
    with pytest.raises(LayerpruneError, match="use --unit block"):
        scorer("bi")(model, adapter, windows(), unit="module")
    with pytest.raises(LayerpruneError, match="drop --iterative"):
        scorer("angular")(model, adapter, windows(), removed=[True, False, False])
    with pytest.raises(LayerpruneError, match="use --unit block"):
        mamba = tiny_model("mamba", num_layers=2)
        scorer("taylor")(mamba, ModelAdapter(mamba), windows(), unit="module")


# ---- Taylor+ in low precision -------------------------------------------------------------------
def layer_gradients(model, ids, scale=None):
    """{name: gradient} of every block weight, and the last loss scale: by a plain backward (scale
    None) or through Taylor+'s `backward_each` from the given loss scale (each weight must arrive
    exactly once)."""
    from layerprune.scorers.taylor import backward_each

    names = {p: n for n, p in model.named_parameters()}
    params = [p for n, p in model.named_parameters() if ".layers." in n and n.endswith("weight")]
    for p in model.parameters():
        p.requires_grad_(p in set(params))
    if scale is None:
        model(input_ids=ids, labels=ids).loss.backward()
        grads = {names[p]: p.grad.double() for p in params}
        model.zero_grad(set_to_none=True)
        return grads, None
    got = {}

    def keep(p, g):
        assert names[p] not in got, "a weight reduced twice"
        got[names[p]] = g.double()

    last = backward_each(lambda: model(input_ids=ids, labels=ids).loss, params, keep, scale)
    assert got.keys() == {names[p] for p in params}
    return got, last


def worst_relative_error(got: dict, want: dict) -> float:
    return max(float((got[k] - want[k]).norm() / want[k].norm()) for k in want)


@pytest.mark.usefixtures("one_thread")
def test_fp16_taylor_gradients_with_loss_scaling_match_float32(fixture_lm):
    """The bundled model's block-weight gradients on 4 x 64 calibration tokens (half of them under
    6e-5, fp16's smallest normal number) from an fp16 copy through Taylor+'s scaled backward, against
    fp32 gradients of the same fp16 weights (fp32's own error, ~1e-6, is far below what is tested).

    Tolerance, derived: to first order a gradient's rounding error is proportional to the unit
    roundoff, 2^-11 for fp16 and 2^-8 for bf16; bf16 has fp32's exponent range, so its error is
    rounding alone. Without underflow fp16 should be 8x closer than bf16; we allow 4x that (the
    constants of the two formats differ): worst tensor's relative error < bf16's / 2. An unscaled
    fp16 backward flushes the small gradients and fails it (measured: 7e-2 against bf16's 4.5e-2;
    with scaling 4e-3)."""
    import layerprune as lp

    ids = lp.calibration(fixture_lm).input_ids[:4, :64]
    bf16 = copy.deepcopy(fixture_lm.model).bfloat16()
    got, _ = layer_gradients(bf16, ids)
    err_bf16 = worst_relative_error(got, layer_gradients(bf16.float(), ids)[0])
    fp16 = copy.deepcopy(fixture_lm.model).half()
    want, _ = layer_gradients(copy.deepcopy(fp16).float(), ids)
    tolerance = err_bf16 / 2
    assert worst_relative_error(layer_gradients(fp16, ids)[0], want) > tolerance  # what scaling fixes
    got, last = layer_gradients(fp16, ids, 2.0**16)
    assert worst_relative_error(got, want) < tolerance and last == 2.0**16
    got, last = layer_gradients(fp16, ids, 2.0**24)  # overflows: backs off for the weights left
    assert worst_relative_error(got, want) < tolerance and last < 2.0**24
    assert all(p.grad is None for p in fp16.parameters())


@pytest.mark.usefixtures("one_thread")
def test_taylor_in_low_precision_ranks_blocks_like_float32(fixture_lm):
    """bf16 and fp16 Taylor+ scores of the bundled model (10 x 128 calibration tokens): the four
    lowest blocks are fp32's, and each score is within 1 % (bf16's unit roundoff is 0.4 %; the sums
    run over a million terms whose rounding errors mostly cancel)."""
    import layerprune as lp

    windows = lp.calibration(fixture_lm)
    want = lp.score(fixture_lm, "taylor", windows, progress=False).importance
    for dtype in (torch.bfloat16, torch.float16):
        low = copy.copy(fixture_lm)
        low.model = copy.deepcopy(fixture_lm.model).to(dtype)
        low.adapter = ModelAdapter(low.model)
        result = lp.score(low, "taylor", windows, progress=False)
        got = result.importance
        assert sorted(range(12), key=lambda i: got[i])[:4] == sorted(range(12), key=lambda i: want[i])[:4]
        assert got == pytest.approx(want, rel=1e-2), dtype
        assert (result.extra.get("loss_scale") == 2.0**16) == (dtype == torch.float16)
