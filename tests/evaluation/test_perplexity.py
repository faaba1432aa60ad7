import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from layerprune.errors import LayerpruneError
from layerprune.evaluation.perplexity import perplexity
from layerprune.models.loading import FIXTURE_DIR


def test_fixture_perplexity_matches_plain_transformers(fixture_lm):
    ours = perplexity(fixture_lm, "fixture:test", seqlen=128, max_windows=48, progress=False)

    # Independent computation: plain transformers calls, HF's own loss, no layerprune code.
    tok = AutoTokenizer.from_pretrained(FIXTURE_DIR)
    model = AutoModelForCausalLM.from_pretrained(FIXTURE_DIR, dtype=torch.float32).eval()
    text = (FIXTURE_DIR / "data" / "test.txt").read_text(encoding="utf-8")
    ids = tok(text, return_tensors="pt", verbose=False).input_ids[0]  # BOS once, at the start
    losses = []
    with torch.no_grad():
        for w in range(48):
            window = ids[w * 128 : (w + 1) * 128][None]
            losses.append(model(input_ids=window, labels=window).loss.item())
    expected = math.exp(sum(losses) / len(losses))  # every window predicts 127 tokens
    assert ours.ppl == pytest.approx(expected, rel=1e-5)
    assert ours.tokens == 48 * 127
    assert ours.protocol["seqlen"] == 128 and ours.protocol["bos"] == "first"


def test_perplexity_under_a_mask_differs_and_bad_inputs(fixture_lm):
    dense = perplexity(fixture_lm, "fixture:test", seqlen=64, max_windows=8, progress=False)
    skipped = perplexity(
        fixture_lm, "fixture:test", seqlen=64, max_windows=8, mask=[1] * 11 + [0], progress=False
    )
    assert skipped.ppl != dense.ppl
    with pytest.raises(LayerpruneError, match="exceeds the model's context of 256"):
        perplexity(fixture_lm, "fixture:test", seqlen=2048)
    with pytest.raises(LayerpruneError, match="12 block units"):
        perplexity(fixture_lm, "fixture:test", seqlen=64, mask=[1] * 11)
    with pytest.raises(LayerpruneError, match="removes every block"):
        perplexity(fixture_lm, "fixture:test", seqlen=64, mask=[0] * 12)
