"""One serving engine holding one model, answering bench/engines.py's requests (runs in the engine's venv).

    <venv>/bin/python bench/serving_engines/worker.py vllm|mlx MODEL_DIR

Requests come one JSON object a line on stdin; each answer is one JSON line on the file descriptor
the process started with as stdout (the engines' own logs are sent to stderr). Every request passes
token ids, never text, so both sides see the same tokens.

- {"op": "logprobs", "ids": [...], "topk": K, "out": PATH}: the engine's next-token log-probabilities
  after every prefix of `ids`. vLLM: its `prompt_logprobs` (the top K and the actual next token, per
  position; the last position from the one sampled token's `logprobs`), answered inline as
  [[token ids], [log-probs]] per position. mlx-lm: the full vocabulary (log-softmax of the model's
  logits), saved as float32 .npy at PATH.
- {"op": "greedy", "ids": [...], "new": N}: N greedily chosen token ids.
- {"op": "generate", "prompts": [[...], ...], "new": N}: wall seconds of one call generating N tokens
  for every prompt at once (vLLM `LLM.generate`, ignore_eos; mlx-lm `generate_step`, one prompt).
- {"op": "profile", "prompts": [[...], ...], "new": N}: vLLM only, started with LAYERPRUNE_VLLM_PROFILE=DIR:
  a generate call under torch's profiler; vLLM writes its op table into DIR.
- {"op": "quit"}.

vLLM runs eagerly unless LAYERPRUNE_VLLM_COMPILE=1 (then its default compilation: torch.compile of the
forward, compiled at load).
"""

from __future__ import annotations

import json
import os
import sys
import time


def vllm_engine(model: str):
    from vllm import LLM, SamplingParams

    profile_dir = os.environ.get("LAYERPRUNE_VLLM_PROFILE")  # the "profile" op: torch's profiler, CPU ops
    extra = {"profiler_config": {"profiler": "torch", "torch_profiler_dir": profile_dir,
                                 "torch_profiler_with_stack": False}} if profile_dir else {}  # fmt: skip
    eager = os.environ.get("LAYERPRUNE_VLLM_COMPILE") != "1"  # 1: vLLM's compiled forward (torch.compile)
    llm = LLM(model=model, dtype="float32", enforce_eager=eager, seed=0, max_num_seqs=16,
              skip_tokenizer_init=True, max_logprobs=64, enable_prefix_caching=False, **extra)  # fmt: skip

    def prompt(ids):
        return {"prompt_token_ids": list(ids)}

    def logprobs(req):
        ids, k = req["ids"], req["topk"]
        params = SamplingParams(
            max_tokens=1, temperature=0.0, prompt_logprobs=k, logprobs=k, detokenize=False
        )
        out = llm.generate([prompt(ids)], params, use_tqdm=False)[0]
        rows = list(out.prompt_logprobs[1:]) + [out.outputs[0].logprobs[0]]  # position i predicts token i + 1
        return {"positions": [[list(r), [r[t].logprob for t in r]] for r in rows]}

    def greedy(req):
        params = SamplingParams(max_tokens=req["new"], temperature=0.0, ignore_eos=True, detokenize=False)
        out = llm.generate([prompt(req["ids"])], params, use_tqdm=False)[0]
        return {"ids": list(out.outputs[0].token_ids)}

    def generate(req):
        params = SamplingParams(max_tokens=req["new"], temperature=0.0, ignore_eos=True, detokenize=False)
        prompts = [prompt(p) for p in req["prompts"]]
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - t0
        return {"seconds": seconds, "generated": sum(len(o.outputs[0].token_ids) for o in outs)}

    def profile(req):
        """One generate call under torch's profiler; vLLM writes its table of the ops' self CPU time
        (top 50) into the profile folder's *.profiler_out.txt when the profile stops."""
        params = SamplingParams(max_tokens=req["new"], temperature=0.0, ignore_eos=True, detokenize=False)
        llm.start_profile()
        t0 = time.perf_counter()
        llm.generate([prompt(p) for p in req["prompts"]], params, use_tqdm=False)
        seconds = time.perf_counter() - t0
        llm.stop_profile()
        return {"seconds": seconds}

    return {"logprobs": logprobs, "greedy": greedy, "generate": generate, "profile": profile}


def mlx_engine(model: str):
    import mlx.core as mx
    import numpy as np
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    net, _ = load(model)

    def logprobs(req):
        logits = net(mx.array(req["ids"])[None])[0].astype(mx.float32)
        lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        np.save(req["out"], np.array(lp))
        return {"saved": req["out"], "dtype": str(logits.dtype)}

    def run(ids, n):
        out = []
        for token, _ in generate_step(mx.array(ids), net, max_tokens=n):
            out.append(int(token))
        return out

    def greedy(req):
        return {"ids": run(req["ids"], req["new"])}

    def generate(req):
        if len(req["prompts"]) != 1:
            raise ValueError("mlx-lm's generate runs one prompt at a time")
        t0 = time.perf_counter()
        ids = run(req["prompts"][0], req["new"])
        return {"seconds": time.perf_counter() - t0, "generated": len(ids)}

    return {"logprobs": logprobs, "greedy": greedy, "generate": generate}


def main() -> int:
    engine, model = sys.argv[1], sys.argv[2]
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # the engines print; only answers go to the original stdout
    t0 = time.perf_counter()
    ops = (vllm_engine if engine == "vllm" else mlx_engine)(model)
    answers.write(json.dumps({"ready": True, "load_seconds": time.perf_counter() - t0}) + "\n")
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "quit":
            break
        try:
            answers.write(json.dumps(ops[req["op"]](req)) + "\n")
        except Exception as e:  # the orchestrator records it as the row's failure
            answers.write(json.dumps({"error": f"{type(e).__name__}: {e}"}) + "\n")
    return 0


if __name__ == "__main__":  # vLLM spawns its engine process, which imports this file again
    raise SystemExit(main())
