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
