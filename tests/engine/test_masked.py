"""The trie evaluation equals a plain forward per mask; the store makes runs resumable."""

import itertools
import random

import pytest
import torch

from layerprune.engine.masked import BlockRunner, MaskEvaluator, evaluate_masks
from layerprune.engine.store import EvalStore, mask_key
from layerprune.engine.vocab import token_nll
from layerprune.errors import LayerpruneError
from layerprune.models.adapter import ModelAdapter
from layerprune.models.tiny import ARCHS as TINY_ARCHS
from layerprune.models.tiny import tiny_model


def reference_nll(model, adapter, x, mask, granularity="block"):
    """Independent: HF forward with the units skipped, NLL from log_softmax by hand."""
    with torch.no_grad(), adapter.skip(mask, granularity):
        logits = model(input_ids=x, use_cache=False).logits.double()
    logp = torch.log_softmax(logits[:, :-1], -1)
    return -float(logp.gather(-1, x[:, 1:, None]).sum())


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2", "mamba"])
def test_trie_equals_per_mask_forward(arch):
    model = tiny_model(arch, num_layers=5)
    adapter = ModelAdapter(model)
    x = torch.randint(3, 128, (5, 12))
    runner = BlockRunner(model, adapter, x, batch_size=2)
    masks = [m for m in itertools.product([1, 0], repeat=5) if any(m)]
    random.Random(0).shuffle(masks)
    values = evaluate_masks(runner, masks)
    for m, v in zip(masks, values):
        assert v == pytest.approx(reference_nll(model, adapter, x, m), rel=1e-5)
    # 31 masks of 5 blocks, 3 micro-batches: the trie runs each of the 31 keep-nodes once.
    assert runner.block_calls == 31 * 3 < sum(sum(m) for m in masks) * 3


def test_module_masks_and_leave_one_out_cost():
    model = tiny_model("qwen2", num_layers=4)
    adapter = ModelAdapter(model)
    x = torch.randint(3, 128, (3, 12))
    masks = [m for m in itertools.product([1, 0], repeat=8) if any(m)][:60]
    values = evaluate_masks(BlockRunner(model, adapter, x, batch_size=3), masks, "module")
    for m, v in zip(masks, values):
        assert v == pytest.approx(reference_nll(model, adapter, x, m, "module"), rel=1e-5)
    runner = BlockRunner(model, adapter, x, batch_size=3)
    loo = [[0 if j == i else 1 for j in range(4)] for i in range(4)]
    evaluate_masks(runner, loo)
    # dense path 0,1,2 (block 3 is never needed) + 3 + 2 + 1 after each skip: L(L+1)/2 - 1, not L(L-1)
    assert runner.block_calls == 3 + 3 + 2 + 1


def test_token_nll_matches_cross_entropy():
    logits = torch.randn(2, 7, 11)
    ids = torch.randint(0, 11, (2, 7))
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1), reduction="sum"
    )
    assert float(token_nll(logits, ids).sum()) == pytest.approx(float(ce), rel=1e-6)


def test_store_resumes_without_reevaluating(tmp_path):
    model = tiny_model("llama", num_layers=6)
    adapter = ModelAdapter(model)
    x = torch.randint(3, 128, (2, 10))
    masks = [m for m in itertools.product([1, 0], repeat=6) if sum(m) >= 3][:30]
    path = tmp_path / "evals.sqlite"

    class Crash(Exception):
        pass

    store = EvalStore(path, "model-a", "data-a")
    first = MaskEvaluator(model, adapter, x, store=store, progress=False)
    seen = []
    real_put = store.put

    def put_then_crash(key, nll, tokens, extra=None):
        real_put(key, nll, tokens, extra)
        seen.append(key)
        if len(seen) == 12:
            raise Crash

    store.put = put_then_crash
    with pytest.raises(Crash):
        first.nll(masks)
    store.close()

    store = EvalStore(path, "model-a", "data-a")
    assert len(store) == 12
    second = MaskEvaluator(model, adapter, x, store=store, progress=False)
    values = second.nll(masks)
    assert second.evaluations == len(masks) - 12
    fresh = MaskEvaluator(model, adapter, x, progress=False).nll(masks)
    assert values == fresh
    third = MaskEvaluator(model, adapter, x, store=store, progress=False)
    assert third.nll(masks) == values and third.evaluations == 0
    assert store.get(mask_key(masks[0])) == (values[0], first.tokens)


def test_store_bound_to_model_and_data(tmp_path):
    EvalStore(tmp_path / "s.sqlite", "model-a", "data-a").close()
    with pytest.raises(LayerpruneError, match="use a new --store path"):
        EvalStore(tmp_path / "s.sqlite", "model-b", "data-a")
    with pytest.raises(LayerpruneError, match="use a new --store path"):
        EvalStore(tmp_path / "s.sqlite", "model-a", "data-b")
    (tmp_path / "junk.sqlite").write_bytes(b"definitely not sqlite" * 100)
    with pytest.raises(LayerpruneError, match="not an evaluation store"):
        EvalStore(tmp_path / "junk.sqlite", "m", "d")


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_fused_head_equals_the_models_own_logits(arch, monkeypatch):
    """The chunked head (logsumexp fused with the output embedding) against the model's logits,
    with chunks that split windows, on every architecture (Gemma 2's final softcapping included)."""
    import layerprune.engine.vocab as vocab

    monkeypatch.setattr(vocab, "MAX_CHUNK", 7)
    model = tiny_model(arch, num_layers=3)
    adapter = ModelAdapter(model)
    x = torch.randint(3, 128, (3, 12))
    runner = BlockRunner(model, adapter, x, batch_size=2)
    states = runner.embed()
    for i in range(3):
        states = runner.block(i, states)
    with torch.no_grad():
        logits = model(input_ids=x, use_cache=False).logits.double()
    expected = -torch.log_softmax(logits[:, :-1], -1).gather(-1, x[:, 1:, None]).squeeze(-1).sum(1)
    assert adapter.head is not None  # every supported architecture lets its output embedding be probed
    assert torch.allclose(runner.nll_per_window(states), expected, rtol=1e-5)
