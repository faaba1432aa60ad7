"""A tiny DeciLM export served by vLLM and by mlx-lm: its greedy continuation is layerprune's.

Neither engine is installed by `make test`: each test runs where its engine imports in this
interpreter, or in the interpreter named by $LAYERPRUNE_VLLM_PYTHON / $LAYERPRUNE_MLX_PYTHON (e.g. the
venvs bench/engines.py builds), and is skipped with the reason otherwise. The engine runs in a
subprocess either way (vLLM spawns its engine process, which needs a script file to re-import).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from layerprune.checkpoint import export
from layerprune.models.decilm import to_decilm
from layerprune.models.loading import load
from layerprune.models.shrink import shrink
from layerprune.models.width import WidthMask

pytestmark = pytest.mark.usefixtures("one_thread")
SRC = Path(__file__).resolve().parents[2] / "src"
PROMPT = [5, 17, 301, 42, 1000, 77, 8, 2048, 9, 640, 33, 12]
NEW = 16

VLLM = """
import json, sys
if __name__ == "__main__":  # vLLM spawns its engine process, which re-imports this file
    from importlib.metadata import entry_points
    if not any(e.value.startswith("layerprune.") for e in entry_points(group="vllm.general_plugins")):
        from layerprune.serving.vllm_plugin import register  # layerprune on PYTHONPATH, not installed
        register()
    from vllm import LLM, SamplingParams
    llm = LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, skip_tokenizer_init=True)
    params = SamplingParams(max_tokens=int(sys.argv[3]), temperature=0.0, ignore_eos=True, detokenize=False)
    out = llm.generate([{"prompt_token_ids": json.loads(sys.argv[2])}], params, use_tqdm=False)
    print("IDS " + json.dumps(list(out[0].outputs[0].token_ids)))
"""
MLX = """
import json, sys
import mlx.core as mx
from mlx_lm import load
from mlx_lm.generate import generate_step
model, _ = load(sys.argv[1])
ids = [int(t) for t, _ in generate_step(mx.array(json.loads(sys.argv[2])), model, max_tokens=int(sys.argv[3]))]
print("IDS " + json.dumps(ids))
"""


def interpreter(module: str, variable: str) -> str:
    if importlib.util.find_spec(module) is not None:
        return sys.executable
    if os.environ.get(variable):
        return os.environ[variable]
    pytest.skip(
        f"{module} is not importable here and ${variable} is unset (bench/engines.py builds such a venv)"
    )


@pytest.fixture(scope="module")
def deci_export(tmp_path_factory):
    """The bundled model, as DeciLM: MLPs of 512 / 256 / 768 channels, attention removed in blocks 3
    and 7, block 5 deleted."""
    lm = load("fixture", device="cpu", quiet=True)
    keep = [list(range(512)) if i % 3 == 0 else list(range(256)) if i % 3 == 1 else None for i in range(12)]
    shrink(lm.adapter, [WidthMask(None, k) for k in keep])
    assert to_decilm(lm.adapter, {3: {"attn"}, 5: {"attn", "mlp"}, 7: {"attn"}}) == [5]
    lm.source_dtype = torch.float32  # fp32 on both sides: bf16 arithmetic differs between engines
    folder = tmp_path_factory.mktemp("deci") / "out"
    export(lm, folder, None)
    doc = json.loads((folder / "config.json").read_text())
    assert [b["attention"]["no_op"] for b in doc["block_configs"]].count(True) == 2
    return folder


@pytest.fixture(scope="module")
def standard_export(tmp_path_factory):
    """The bundled model with RoPE base 100000 (SmolLM2's; mlx-lm's default is 10000), exported as a
    standard checkpoint: transformers 5 states it only as rope_parameters unless we add the older keys."""
    lm = load("fixture", device="cpu", quiet=True)
    lm.model.config.rope_parameters = {**lm.model.config.rope_parameters, "rope_theta": 100000.0}
    lm.source_dtype = torch.float32  # fp32 on both sides: bf16 arithmetic differs between engines
    folder = tmp_path_factory.mktemp("std") / "out"
    export(lm, folder, None)
    return folder


def test_a_standard_export_states_rope_in_both_spellings(standard_export):
    doc = json.loads((standard_export / "config.json").read_text())
    assert doc["rope_parameters"] == {"rope_theta": 100000.0, "rope_type": "default"}
    assert doc["rope_theta"] == 100000.0 and "rope_scaling" not in doc
    assert load(str(standard_export), quiet=True).model.config.rope_parameters["rope_theta"] == 100000.0


LONG = [(7 * i + 3) % 8000 + 100 for i in range(200)]  # far positions: a wrong RoPE base shows there


def greedy(folder: Path, prompt=PROMPT) -> list[int]:
    """layerprune's continuation, argmax step by step over the whole sequence (no cache, no generate)."""
    model = load(str(folder), quiet=True).model
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(NEW):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def run(python: str, script: str, folder: Path, tmp_path: Path, prompt=PROMPT) -> list[int]:
    path = tmp_path / "engine.py"
    path.write_text(script)
    env = {**os.environ, "PYTHONPATH": str(SRC), "VLLM_CPU_KVCACHE_SPACE": "1"}
    r = subprocess.run([python, str(path), str(folder), json.dumps(prompt), str(NEW)], capture_output=True,
                       text=True, env=env, timeout=1200)  # fmt: skip
    lines = [line for line in r.stdout.splitlines() if line.startswith("IDS ")]
    assert r.returncode == 0 and lines, r.stderr[-3000:]
    return json.loads(lines[-1][4:])


def test_vllm_serves_a_decilm_export_through_the_plugin(deci_export, tmp_path):
    python = interpreter("vllm", "LAYERPRUNE_VLLM_PYTHON")
    assert run(python, VLLM, deci_export, tmp_path) == greedy(deci_export)


def test_mlx_lm_serves_a_decilm_export(deci_export, tmp_path):
    python = interpreter("mlx_lm", "LAYERPRUNE_MLX_PYTHON")
    assert run(python, MLX, deci_export, tmp_path) == greedy(deci_export)


def test_mlx_lm_serves_a_standard_export_with_its_rope_base(standard_export, tmp_path):
    python = interpreter("mlx_lm", "LAYERPRUNE_MLX_PYTHON")
    assert run(python, MLX, standard_export, tmp_path, LONG) == greedy(standard_export, LONG)
