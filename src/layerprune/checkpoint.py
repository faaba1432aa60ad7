"""Write a pruned model as a standard checkpoint, atomically, never inside the input model.

Next to the weights (safetensors, in the source checkpoint's dtype) and tokenizer go the plan, a
report.json (versions, seed, data fingerprint, scores, removed units, parameter counts, evaluation
protocol and results) and a short model card naming the base model.
"""

from __future__ import annotations

import json
from pathlib import Path

from .io import atomic_dir, atomic_write_json, check_output_outside
from .plans import Plan
from .provenance import stamp


def export(lm, out: str | Path, plan: Plan, report: dict | None = None, overwrite: bool = False) -> Path:
    """Write the (pruned) model, its tokenizer, the plan, report.json and a model card to `out`."""
    report = report or {}
    out = Path(out)
    check_output_outside(out, lm.path)
    model = lm.model
    dtype = lm.source_dtype or next(model.parameters()).dtype
    with atomic_dir(out, overwrite=overwrite) as tmp:
        state = {k: v.detach().to(dtype) for k, v in model.state_dict().items()}
        model.config.dtype = dtype
        model.save_pretrained(tmp, state_dict=state)
        lm.tokenizer.save_pretrained(tmp)
        plan.save(tmp / "plan.json")
        full = {"base_model": plan.model, "plan": plan.to_dict(), **report, **stamp()}
        atomic_write_json(tmp / "report.json", full)
        (tmp / "README.md").write_text(model_card(plan, full), encoding="utf-8")
    return out


def model_card(plan: Plan, report: dict) -> str:
    base = plan.model["name"]
    counts = report.get("pruning", {})
    lines = [
        "---",
        f"base_model: {base}" if "/" in base else f"# base model: {base}",
        "library_name: transformers",
        "tags: [layerprune, pruned]",
        "---",
        "",
        f"# {Path(base).name} pruned with layerprune ({plan.kind}, {plan.method})",
        "",
        f"- Base model: `{base}` (fingerprint `{plan.model['fingerprint']}`, {plan.model['num_blocks']} blocks)",
        f"- Method: {plan.method}; parameters: `{json.dumps(plan.params, default=str)}`",
    ]
    if plan.kind == "depth":
        lines.append(f"- Removed ({plan.unit} units): {', '.join(plan.remove)}")
    if plan.kind == "sparsity":
        lines.append(
            f"- Pruner: {plan.pruner}{f' {plan.nm[0]}:{plan.nm[1]}' if plan.nm else ''}; zeros are stored densely "
            "(no memory saving or speed-up without sparse kernels)"
        )
    if counts:
        lines.append(
            f"- Parameters: {counts.get('parameters_before', 0):,} -> {counts.get('parameters_after', 0):,}"
        )
    if plan.calibration:
        c = plan.calibration
        lines.append(
            f"- Calibration: {c.get('dataset')} ({c.get('samples')} x {c.get('seqlen')} tokens, seed {c.get('seed')}, "
            f"fingerprint {c.get('fingerprint')})"
        )
    for r in report.get("evaluation", []):
        p = r["protocol"]
        lines.append(f"- Perplexity on {p['dataset']} (seqlen {p['seqlen']}, BOS {p['bos']}): {r['ppl']:.4f}")
    lines += [
        "",
        "Loads with plain transformers:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
        "```",
        "",
        "`plan.json` is the decision that produced it and `report.json` the full record.",
        "",
    ]
    return "\n".join(lines)
