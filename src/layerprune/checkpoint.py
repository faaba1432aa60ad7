"""Write a pruned model as a standard checkpoint, atomically, never inside the input model.

Next to the weights (safetensors, in the source checkpoint's dtype) and tokenizer go the plan, a
report.json (versions, seed, data fingerprint, scores, removed units, parameter counts, evaluation
protocol and results) and a short model card naming the base model.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from .io import atomic_dir, atomic_write_json
from .models.decilm import DEPLOY_KEY, config_dict
from .models.gguf import SOURCE_FILE
from .models.loading import dtype_name
from .plans import Plan
from .provenance import stamp


def export(
    lm,
    out: str | Path,
    plan: Plan | None,
    report: dict | None = None,
    overwrite: bool = False,
    extras: Callable[[Path], object] | None = None,
) -> Path:
    """Write the (pruned) model, its tokenizer, the plan, report.json and a model card to `out`.
    `plan` None: a model no plan of ours made (e.g. a dense model after recovery). `extras(folder)`
    writes more files (charts, logs) into the folder before it appears."""
    report = report or {}
    out = Path(out)
    model = lm.model
    dtype = lm.source_dtype or model.get_input_embeddings().weight.dtype
    with atomic_dir(out, overwrite=overwrite, inputs={"model folder": lm.path}) as tmp:
        if lm.offloaded:  # tensor by tensor into shards laid out like the input's
            lm.adapter.offload.save(tmp, dtype)
            _state_dtype(tmp / "config.json", dtype)
        else:
            converted: dict = {}  # tied weights (embedding = lm_head) stay one tensor, stored once
            state = {}
            for k, v in model.state_dict().items():
                key = (v.data_ptr(), tuple(v.shape))
                if key not in converted:
                    converted[key] = v.detach().to(dtype)
                state[k] = converted[key]
            model.save_pretrained(tmp, state_dict=state)
            if getattr(model.config, DEPLOY_KEY, None) == "decilm":  # per-block widths the engines load
                atomic_write_json(tmp / "config.json", config_dict(lm.adapter, dtype))
            else:  # save_pretrained states the in-memory dtype: the file's tensors are in `dtype`
                _state_dtype(tmp / "config.json", dtype)
        lm.tokenizer.save_pretrained(tmp)
        if plan is not None:
            plan.save(tmp / "plan.json")
        base = plan.model if plan is not None else {"name": lm.name, "fingerprint": lm.fingerprint}
        origin = getattr(lm, "origin", None)
        if origin:  # weights dequantized from a GGUF: the record travels with every export
            base = {**base, "weights": origin}
            atomic_write_json(tmp / SOURCE_FILE, origin)
        full = {
            "base_model": base,
            "plan": plan.to_dict() if plan else None,
            "numerics": {**lm.numerics, "stored": dtype_name(dtype)},  # computed in, and written in
            **report,
            **stamp(),
        }
        atomic_write_json(tmp / "report.json", full)
        (tmp / "README.md").write_text(model_card(plan, full), encoding="utf-8")
        if extras is not None:
            extras(tmp)
    return out


def _state_dtype(config: Path, dtype) -> None:
    """config.json says the dtype its weights are stored in, so a reload with 'auto' computes in it;
    and its RoPE in the older keys too (`legacy_rope`)."""
    doc = json.loads(config.read_text(encoding="utf-8"))
    doc["dtype"] = dtype_name(dtype)
    doc.pop("torch_dtype", None)  # the older name of the same field; one statement only
    atomic_write_json(config, legacy_rope(doc))


def legacy_rope(doc: dict) -> dict:
    """transformers 5 writes RoPE only as `rope_parameters`; mlx-lm (0.32) reads `rope_theta` and
    `rope_scaling` and silently takes 10000 without them (SmolLM2's is 100000: 82 % top-1 agreement with
    the same weights). Both keys are written beside it, with the same values; transformers and vLLM read
    either form. A per-layer-type (nested) rope_parameters has no such spelling and is left alone."""
    rope = doc.get("rope_parameters")
    if not isinstance(rope, dict) or not isinstance(rope.get("rope_theta"), (int, float)):
        return doc
    doc.setdefault("rope_theta", rope["rope_theta"])
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    if scaling.get("rope_type", "default") != "default":
        doc.setdefault("rope_scaling", scaling)
    return doc


def read_record(model_dir: str | Path | None) -> tuple[Plan | None, dict]:
    """The plan and report.json that layerprune wrote next to a model (None and {} where absent)."""
    if model_dir is None:
        return None, {}
    model_dir = Path(model_dir)
    plan = Plan.load(model_dir / "plan.json") if (model_dir / "plan.json").is_file() else None
    report = {}
    if (model_dir / "report.json").is_file():
        from .io import read_json

        report = read_json(model_dir / "report.json", "report", "layerprune apply")
    return plan, report


def model_card(plan: Plan | None, report: dict) -> str:
    base = report["base_model"]["name"]
    counts = report.get("pruning", {})
    what = f"pruned with layerprune ({plan.kind}, {plan.method})" if plan else "processed with layerprune"
    recovery = report.get("recovery")
    if recovery:
        what += f", recovered by {'LoRA' if recovery['method'] == 'lora' else 'continued pretraining'}"
        what += " with distillation from the dense model" if recovery.get("distillation") else ""
    lines = [
        "---",
        f"base_model: {base}" if "/" in base else f"# base model: {base}",
        "library_name: transformers",
        "tags: [layerprune, pruned]",
        "---",
        "",
        f"# {Path(base).name} {what}",
        "",
        f"- Base model: `{base}` (fingerprint `{report['base_model']['fingerprint']}`"
        + (f", {plan.model['num_blocks']} blocks)" if plan else ")"),
    ]
    weights = report["base_model"].get("weights")
    if weights:
        lines.append(
            f"- Weights: dequantized to float32 from the {weights['quantization']} GGUF `{weights['file']}` "
            f"(sha256 {weights['sha256'][:16]}...): quantization noise of the source is in the weights"
        )
    if plan is not None:
        lines.append(f"- Method: {plan.method}; parameters: `{json.dumps(plan.params, default=str)}`")
    if plan is not None and plan.kind == "depth":
        lines.append(f"- Removed ({plan.unit} units): {', '.join(plan.remove)}")
    if plan is not None and plan.kind == "sparsity":
        lines.append(
            f"- Pruner: {plan.pruner}{f' {plan.nm[0]}:{plan.nm[1]}' if plan.nm else ''}; zeros are stored densely "
            "(no memory saving or speed-up without sparse kernels)"
        )
    if counts:
        lines.append(
            f"- Parameters: {counts.get('parameters_before', 0):,} -> {counts.get('parameters_after', 0):,}"
        )
    if recovery:
        d = recovery["data"]
        lines.append(
            f"- Recovery: {recovery['method']}, {recovery['steps']} steps, {recovery['tokens']:,} tokens of "
            f"{d.get('dataset')} ({d.get('format')}, seqlen {d.get('seqlen')}), merged into the weights"
        )
        kd = recovery.get("distillation")
        if kd:
            cache = f", from a cache of its top-{kd['topk']} log-probabilities" if kd.get("cache") else ""
            lines.append(
                f"- Distilled from `{kd['teacher']}` (fingerprint `{kd['teacher_fingerprint']}`): {kd['loss']}{cache}"
            )
    if plan is not None and plan.calibration:
        c = plan.calibration
        lines.append(
            f"- Calibration: {c.get('dataset')} ({c.get('samples')} x {c.get('seqlen')} tokens, seed {c.get('seed')}, "
            f"fingerprint {c.get('fingerprint')})"
        )
    for r in report.get("evaluation", []):
        p = r["protocol"]
        lines.append(f"- Perplexity on {p['dataset']} (seqlen {p['seqlen']}, BOS {p['bos']}): {r['ppl']:.4f}")
    if plan is not None and getattr(plan, "deploy", None) == "decilm":
        lines += [
            "",
            "A DeciLM / Nemotron-NAS checkpoint (`block_configs`: per block, attention kept or removed, MLP",
            "width from `ffn_mult`). vLLM serves it as `DeciLMForCausalLM` (`vllm serve this/folder` where layerprune",
            "is installed beside vLLM: its plugin registers the config class, no remote code), mlx-lm as `nemotron-nas`",
            "(`mlx_lm.generate --model this/folder`), llama.cpp after",
            "`layerprune export this/folder --gguf model.gguf` (architecture `deci`); layerprune reads it natively:",
            "",
            "```python",
            "import layerprune as lp",
            'lm = lp.load("path/to/this/folder")',
            "```",
        ]
    else:
        lines += [
            "",
            "Loads with plain transformers:",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
            "```",
        ]
    lines += ["", "`plan.json` is the decision that produced it and `report.json` the full record.", ""]
    return "\n".join(lines)
