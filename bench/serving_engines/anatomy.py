"""Where a decode step's time goes in vLLM-CPU: its own GEMM kernels timed on each model's real shapes
(runs in the vLLM venv; bench/engines.py --anatomy calls it).

    <vllm venv>/bin/python bench/serving_engines/anatomy.py '{"folders": {...}, "batches": [1, 16], ...}'

For every folder, the linear layers of one decode step as vLLM builds them (q/k/v merged into one
QKV GEMM, gate/up into one, then o_proj and down_proj; an attention with no_op has none; the LM head
is the tied embedding, N = vocabulary), each dispatched through vLLM's own
`dispatch_cpu_unquantized_gemm` (oneDNN on this CPU), and timed at M = batch rows: the sum over blocks
and the LM head apart. Folders are interleaved in every repeat (the machine is shared); the median of
the repeats is printed as one JSON line on stdout. What is not timed here (attention over the KV
cache, norms, RoPE, activations, Python per layer, the scheduler, sampling) is the difference to the
engine's measured seconds per step, worked out by the caller.
"""

from __future__ import annotations

import json
import statistics
import sys
import time


def shapes(folder: str) -> dict:
    """(N, K) of every GEMM of a decode step, per block, and the LM head's, from the safetensors."""
    from safetensors import safe_open

    with safe_open(f"{folder}/model.safetensors", "np") as f:
        dims = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (not iterable)
    blocks, i = [], 0
    while any(k.startswith(f"model.layers.{i}.") for k in dims):
        p = f"model.layers.{i}."
        gemms = []
        if p + "self_attn.q_proj.weight" in dims:
            q, k, v = (dims[p + f"self_attn.{n}_proj.weight"] for n in "qkv")
            gemms += [(q[0] + k[0] + v[0], q[1]), dims[p + "self_attn.o_proj.weight"]]
        if p + "mlp.gate_proj.weight" in dims:
            g = dims[p + "mlp.gate_proj.weight"]
            gemms += [(2 * g[0], g[1]), dims[p + "mlp.down_proj.weight"]]
        blocks.append(gemms)
        i += 1
    head = dims.get("lm_head.weight", dims["model.embed_tokens.weight"])
    return {"blocks": blocks, "lm_head": head}


def linear(n: int, k: int):
    """A layer whose cpu_linear is the kernel vLLM would pick for an (N, K) fp32 weight."""
    import torch
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(torch.randn(n, k) * 0.02, requires_grad=False)
    dispatch_cpu_unquantized_gemm(layer, remove_weight=False)
    return layer


def main() -> int:
    import torch

    args = json.loads(sys.argv[1])
    torch.set_num_threads(args.get("threads", 2))
    built = {}
    for name, folder in args["folders"].items():
        s = shapes(folder)
        built[name] = {
            "blocks": [[linear(n, k) for n, k in b] for b in s["blocks"]],
            "lm_head": linear(*s["lm_head"]),
            "block_gemm_params": sum(n * k for b in s["blocks"] for n, k in b),
            "lm_head_params": s["lm_head"][0] * s["lm_head"][1],
            "layers": len(s["blocks"]),
            "attention_layers": sum(1 for b in s["blocks"] if len(b) == 4),
        }
    hidden = next(iter(built.values()))["lm_head"].weight.shape[1]
    runs: dict = {name: {m: {"blocks": [], "lm_head": []} for m in args["batches"]} for name in built}
    for _ in range(args.get("repeats", 7)):
        for m in args["batches"]:
            x = torch.randn(m, hidden)
            inputs = {k: torch.randn(m, k) for b in built.values() for ls in b["blocks"] for k in
                      {layer.weight.shape[1] for layer in ls}}  # fmt: skip
            for name, b in built.items():  # interleaved: a load change hits every folder alike
                with torch.no_grad():
                    t0 = time.perf_counter()
                    for layers in b["blocks"]:
                        for layer in layers:
                            layer.cpu_linear(inputs[layer.weight.shape[1]], layer.weight, None)
                    t1 = time.perf_counter()
                    b["lm_head"].cpu_linear(x, b["lm_head"].weight, None)
                    t2 = time.perf_counter()
                runs[name][m]["blocks"].append(t1 - t0)
                runs[name][m]["lm_head"].append(t2 - t1)
    out = {}
    for name, b in built.items():
        out[name] = {k: b[k] for k in ("block_gemm_params", "lm_head_params", "layers", "attention_layers")}
        for m in args["batches"]:
            r = runs[name][m]
            out[name][f"m{m}"] = {
                "block_gemms_s": statistics.median(r["blocks"]),
                "lm_head_s": statistics.median(r["lm_head"]),
                "block_gemms_range_s": [min(r["blocks"]), max(r["blocks"])],
            }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
