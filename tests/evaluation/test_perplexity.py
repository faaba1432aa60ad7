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


# A fresh process: builds a random Llama (hidden 64, 2 blocks, untied head) with a 128 K vocabulary,
# resets its peak RSS (clear_refs), runs perplexity on 4 windows of 256 tokens in one batch and prints
# the memory that added at its peak (VmHWM - VmRSS before) and the NLL.
_PEAK_SCRIPT = """
import json, torch, transformers as tf
from layerprune.data import Windows
from layerprune.evaluation.perplexity import perplexity_of_windows
from layerprune.models.adapter import ModelAdapter

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

torch.set_num_threads(1)
torch.manual_seed(0)
cfg = tf.LlamaConfig(vocab_size=131072, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
model = tf.LlamaForCausalLM(cfg).eval()
ids = torch.randint(3, 131072, (4, 256))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS")
r = perplexity_of_windows(model, ModelAdapter(model), Windows(ids, {}), batch_size=4, progress=False)
print(json.dumps({"added": status("VmHWM") - before, "nll": r.nll, "tokens": r.tokens}))
"""


def test_perplexity_with_a_128k_vocabulary_stays_under_a_stated_peak_memory():
    """The bound, from the arithmetic: the loss holds at most about three float32 chunks of
    CHUNK_BYTES (32 MiB) at once, and the model's activations at hidden 64 are under 1 MiB a window:
    about 100 MiB, so 256 MiB leaves the allocator a margin. The old path (full logits, then a float32
    log-softmax of them) holds 2 x 4 x 256 x 131072 x 4 bytes = 1 GiB at its peak (measured: 1.5 GiB)."""
    import json
    import os
    import subprocess
    import sys

    import layerprune
    from layerprune.engine.vocab import CHUNK_BYTES

    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc to read the peak resident memory")
    assert CHUNK_BYTES == 32 * 2**20  # the bound below is derived from it
    src = os.path.dirname(os.path.dirname(layerprune.__file__))
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT], capture_output=True, text=True, env=env, check=True
    ).stdout
    r = json.loads(out.strip().splitlines()[-1])
    assert r["tokens"] == 4 * 255 and math.isfinite(r["nll"])
    # A random model's predictions are near uniform: the mean NLL is about log(vocab).
    assert r["nll"] / r["tokens"] == pytest.approx(math.log(131072), rel=0.05)
    assert r["added"] < 256 * 2**20, f"perplexity added {r['added'] / 2**20:.0f} MiB at its peak"
