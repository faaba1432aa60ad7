"""registry.py names what the pruners and scorers implement: every name there works, and its
arithmetic (units, N:M patterns) matches closed forms."""

import pytest
import torch

from layerprune.errors import LayerpruneError
from layerprune.models.adapter import ModelAdapter
from layerprune.models.tiny import VOCAB, tiny_model
from layerprune.pruners.unstructured import prune
from layerprune.registry import SPARSITY_PRUNERS, WIDTH_PRUNERS, Unit, nm_for, parse_nm
from layerprune.scorers import scorer


@pytest.mark.parametrize("pruner", SPARSITY_PRUNERS)
def test_every_sparsity_pruner_named_prunes(pruner):
    model = tiny_model("llama", num_layers=2)
    adapter = ModelAdapter(model)
    targets = dict.fromkeys(adapter.layer_names(), 0.5)
    ids = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    prune(model, adapter, ids, targets, pruner, progress=False)
    for name in targets:
        w = adapter.weight(adapter.layer(name))
        assert abs((w == 0).float().mean().item() - 0.5) < 0.01, name  # counted, not reported


@pytest.mark.parametrize("method", WIDTH_PRUNERS)
def test_every_width_pruner_has_a_scorer(method):
    assert callable(scorer(method))


def test_units_and_patterns():
    assert [str(Unit.parse(t)) for t in ("3", "3.attn", "12.mlp")] == ["3", "3.attn", "12.mlp"]
    assert Unit.parse("3.attn") == Unit(3, "attn") and Unit(2) < Unit(3)
    with pytest.raises(LayerpruneError, match="not a block index"):
        Unit.parse("3.ffn")
    assert parse_nm("2:4") == (2, 4) and parse_nm(None) is None
    with pytest.raises(LayerpruneError, match="smaller than M"):
        parse_nm("4:4")
    # N = round(s * M), clipped to 1 .. M - 1
    assert [nm_for(s, (2, 8)) for s in (0.01, 0.5, 0.6, 0.99)] == [(1, 8), (4, 8), (5, 8), (7, 8)]
