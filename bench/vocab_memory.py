"""Peak memory of perplexity against the vocabulary size: the old path (the model's full forward and
a float32 log-softmax of its [batch x seqlen x vocab] logits) against layerprune's (the model up to its
output embedding, the loss a chunk of tokens at a time: engine/vocab.py).

    python bench/vocab_memory.py [--markdown]        -> bench/results/vocab_memory.json

A tiny random Llama (hidden 64, 2 blocks, output embedding not tied) so that the vocabulary
dominates: its weights are 2 x vocab x 64 x 4 bytes (64 MiB at 128 K). Each case runs in a fresh
process (`--case PATH VOCAB BATCH SEQLEN`), which resets its peak RSS (Linux clear_refs) after the
model is built and reports VmHWM - VmRSS: the memory perplexity added at its peak. The old path at
the default protocol (8 x 2048) is given by arithmetic only (its logits and log-softmax would take
16 GiB at 128 K); every other case runs both paths, interleaved, and checks their NLL agree.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "results" / "vocab_memory.json"
VOCABS = (32 * 1024, 128 * 1024, 256 * 1024)
SHAPES = ((1, 512), (4, 512), (2, 1024))  # (windows per batch, seqlen): both paths
NEW_ONLY = ((8, 2048),)  # the perplexity defaults: the new path only, the old one by arithmetic
MiB = 2**20


def tiny_llama(vocab: int):
    import torch
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    return tf.LlamaForCausalLM(cfg).float().eval()


def case(path: str, vocab: int, batch: int, seqlen: int) -> dict:
    import torch
    from _proc import reset_peak, status

    from layerprune.data import Windows
    from layerprune.evaluation.perplexity import perplexity_of_windows
    from layerprune.models.adapter import ModelAdapter

    torch.set_num_threads(1)
    model = tiny_llama(vocab)
    ids = torch.randint(3, vocab, (batch, seqlen), generator=torch.Generator().manual_seed(1))
    reset_peak()
    before = status("VmRSS")
    t0 = time.perf_counter()
    if path == "old":  # layerprune before: the full forward, then token_nll's log-softmax of every logit
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            nll = float(-logp.gather(-1, ids[:, 1:, None]).squeeze(-1).sum(dim=1).double().sum())
    else:
        nll = perplexity_of_windows(model, ModelAdapter(model), Windows(ids, {}), batch, progress=False).nll
    seconds = time.perf_counter() - t0
    return {
        "path": path,
        "vocab": vocab,
        "batch": batch,
        "seqlen": seqlen,
        "added_peak_bytes": status("VmHWM") - before,
        "rss_before_bytes": before,
        "nll": nll,
        "seconds": seconds,
    }


def run_case(path: str, vocab: int, batch: int, seqlen: int) -> dict:
    cmd = [sys.executable, str(Path(__file__)), "--case", path, str(vocab), str(batch), str(seqlen)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


def old_bytes(vocab: int, batch: int, seqlen: int) -> int:
    """The old path's two float32 [batch x (seqlen) x vocab] tensors: logits and log-softmax."""
    return batch * seqlen * vocab * 4 + batch * (seqlen - 1) * vocab * 4


def main() -> dict:
    from _results import write

    from layerprune.engine.vocab import CHUNK_BYTES, chunk_tokens

    rows = []
    for vocab in VOCABS:
        for batch, seqlen in SHAPES:
            old, new = run_case("old", vocab, batch, seqlen), run_case("new", vocab, batch, seqlen)
            rows.append(
                {
                    "vocab": vocab,
                    "batch": batch,
                    "seqlen": seqlen,
                    "chunk_tokens": chunk_tokens(vocab),
                    "old_added_peak_bytes": old["added_peak_bytes"],
                    "new_added_peak_bytes": new["added_peak_bytes"],
                    "old_logits_and_log_softmax_bytes": old_bytes(vocab, batch, seqlen),
                    "new_over_old_peak": new["added_peak_bytes"] / old["added_peak_bytes"],
                    "nll_rel_diff": abs(new["nll"] - old["nll"]) / abs(old["nll"]),
                    "old_seconds": old["seconds"],
                    "new_seconds": new["seconds"],
                }
            )
            print(json.dumps(rows[-1]), flush=True)
        for batch, seqlen in NEW_ONLY:
            new = run_case("new", vocab, batch, seqlen)
            rows.append(
                {
                    "vocab": vocab,
                    "batch": batch,
                    "seqlen": seqlen,
                    "chunk_tokens": chunk_tokens(vocab),
                    "old_added_peak_bytes": None,
                    "new_added_peak_bytes": new["added_peak_bytes"],
                    "old_logits_and_log_softmax_bytes": old_bytes(vocab, batch, seqlen),
                    "new_over_old_peak": new["added_peak_bytes"] / old_bytes(vocab, batch, seqlen),
                    "nll_rel_diff": None,
                    "old_seconds": None,
                    "new_seconds": new["seconds"],
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    doc = {
        "model": "random Llama, hidden 64, 2 blocks, untied output embedding, float32, CPU, 1 thread",
        "chunk_bytes": CHUNK_BYTES,
        "measure": "VmHWM - VmRSS of a fresh process, peak reset after the model is built",
        "rows": rows,
    }
    return write(doc, OUT)


def markdown(doc: dict) -> str:
    lines = [
        "| vocab | windows × seqlen | old: logits + log-softmax | old peak | new peak | new / old | seconds old / new |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        old = r["old_added_peak_bytes"]
        ran = old is not None
        lines.append(
            f"| {r['vocab'] // 1024} K | {r['batch']} × {r['seqlen']} | "
            f"{r['old_logits_and_log_softmax_bytes'] / MiB:,.0f} MiB | "
            f"{format(old / MiB, ',.0f') + ' MiB' if ran else 'not run'} | {r['new_added_peak_bytes'] / MiB:,.0f} MiB | "
            f"{r['new_over_old_peak']:.3f}{'' if ran else ' (of the arithmetic)'} | "
            f"{format(r['old_seconds'], '.1f') if ran else '–'} / {r['new_seconds']:.1f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--markdown", action="store_true", help="print the README table from the results")
    ap.add_argument("--case", nargs=4, metavar=("PATH", "VOCAB", "BATCH", "SEQLEN"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.case:
        print(json.dumps(case(a.case[0], *map(int, a.case[1:]))))
    elif a.markdown:
        print(markdown(json.loads(OUT.read_text())))
    else:
        main()
        print(markdown(json.loads(OUT.read_text())))
