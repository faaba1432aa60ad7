"""The README's one results table: the real model (SmolLM2-135M-Instruct) pruned each way, from
bench/results/real.json and search.json (one protocol: held-out perplexity on 8 × 512 tokens of
fixture:test, which no calibration saw).

    python -m docgen.headline            # print it
    python -m docgen.headline --write    # put it into README.md between its markers

tests/test_docs.py fails when README.md's table differs from what this renders.
"""

from __future__ import annotations

import argparse
import re

from . import ROOT
from .benchmarks import results

README = ROOT / "README.md"
START, END = "<!-- headline-table -->", "<!-- /headline-table -->"


def _ppl(v: float) -> str:
    return f"{v:.1f}" if v >= 100 else f"{v:.2f}"


def render() -> str:
    real, search = results("real"), results("search")["smollm2"]
    dense_params = real["protocol"]["parameters"]
    speed = real["speed"]
    depth, sparse, width, rec = real["depth"], real["sparsity"], real["width"], real["recovery"]

    def decode(key):
        return f"{speed[key]['decode_speedup']:.2f} ×" if key in speed else "–"

    def params(n):
        return f"{n / 1e6:.1f} M"

    depth_params = speed["depth-ppl-6"]["parameters"]
    rows = [
        ("dense", "–", params(dense_params), _ppl(real["dense"]["heldout_ppl"]), decode("dense")),
        ("6 of 30 blocks", "`ppl` scores (Shortened LLaMA)", params(depth_params),
         _ppl(depth["ppl-6"]["heldout_ppl"]), decode("depth-ppl-6")),
        ("6 of 30 blocks", "… + full recovery (CPT, 10k tokens)", params(depth_params),
         _ppl(rec["depth-ppl-6-full"]["heldout_after"]), decode("depth-ppl-6")),
        ("6 of 30 blocks", "EvoPress search (blocks " + " ".join(search["depth-6-fit512"]["blocks"]) + ")",
         params(depth_params), _ppl(search["depth-6-fit512"]["searched_heldout_ppl"]), decode("depth-ppl-6")),
        ("50 % unstructured", "SparseGPT, uniform", params(dense_params) + " (zeros)",
         _ppl(sparse["uniform-sparsegpt-0.5"]["heldout_ppl"]), "none"),
        ("70 % unstructured", "Wanda, uniform", params(dense_params) + " (zeros)",
         _ppl(sparse["uniform-wanda-0.7"]["heldout_ppl"]), "none"),
        ("70 % unstructured", "Wanda, AlphaPruning allocation", params(dense_params) + " (zeros)",
         _ppl(sparse["alpha-wanda-0.7"]["heldout_ppl"]), "none"),
        ("70 % unstructured", "Wanda, EvoPress search (16 × 512 fitness)", params(dense_params) + " (zeros)",
         _ppl(search["wanda-0.7-fit512"]["searched_heldout_ppl"]), "none"),
        ("20 % width", "FLAP (AL-AM, bias compensation)", params(width["flap-flap-0.2"]["parameters"]),
         _ppl(width["flap-flap-0.2"]["heldout_ppl"]), "–"),
        ("30 % width", "Wanda-sp, uniform", params(width["uniform-wanda-sp-0.3"]["parameters"]),
         _ppl(width["uniform-wanda-sp-0.3"]["heldout_ppl"]), decode("uniform-wanda-sp-0.3")),
        ("30 % width", "Wanda-sp, Self-Pruner search", params(width["search-wanda-sp-0.3-seed0"]["parameters"]),
         _ppl(width["search-wanda-sp-0.3-seed0"]["heldout_ppl"]), decode("search-wanda-sp-0.3-seed0")),
    ]  # fmt: skip
    h = real["protocol"]["heldout"]
    out = [
        "| removed | how | parameters | held-out ppl | decode speed-up |",
        "|---|---|---|---|---|",
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
        f"Held-out perplexity on {h['windows']} × {h['seqlen']} tokens of `{h['dataset']}`; calibration "
        f"`{real['protocol']['calibration_text']}`; decode speed-up of 128 tokens on 2 CPU cores (fp32), "
        "median of interleaved runs. From `bench/results/real.json` and `search.json`.",
    ]
    return "\n".join(out)


def current() -> str | None:
    """README.md's table as it stands (None: no markers)."""
    m = re.search(re.escape(START) + r"\n(.*?)\n" + re.escape(END), README.read_text(), re.S)
    return m.group(1) if m else None


def write() -> None:
    text = README.read_text()
    if current() is None:
        raise SystemExit(f"README.md has no {START} ... {END} markers")
    text = re.sub(
        re.escape(START) + r"\n.*?\n" + re.escape(END),
        lambda _: f"{START}\n{render()}\n{END}",
        text,
        flags=re.S,
    )
    README.write_text(text)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help="put the table into README.md")
    if ap.parse_args().write:
        write()
    else:
        print(render())
