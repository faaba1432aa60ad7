"""PNG charts of scores and plans (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

from ..plotting import pyplot, save_figure


def importance_chart(scores, path: str | Path, removed: list[str] | None = None) -> Path | None:
    """Bar chart of per-unit importance; removed units (a plan) in another colour."""
    plt = pyplot()
    if plt is None:
        return None
    path = Path(path)
    values = [float("nan") if v is None else v for v in scores.importance]
    removed = set(removed or [])
    colours = ["#d62728" if u in removed else "#1f77b4" for u in scores.units]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(values) + 2), 3.6))
    ax.bar(range(len(values)), values, color=colours)
    ax.set_xticks(range(len(values)), scores.units, rotation=90 if len(values) > 24 else 0, fontsize=8)
    positive = [v for v in values if v == v and v > 0]
    if positive and len(positive) == len(values) and max(positive) / min(positive) > 10:
        ax.set_yscale("log")  # a trained model's first block often dwarfs the others
    ax.set_xlabel(scores.unit)
    ax.set_ylabel(f"importance ({scores.method})")
    title = f"{scores.model['name']}: {scores.method} importance per {scores.unit}"
    if removed:
        title += f" (red: removed {', '.join(sorted(removed, key=lambda u: (int(u.split('.')[0]), u)))})"
    ax.set_title(title, fontsize=9)
    if scores.method == "ppl" and "calibration_ppl" in scores.extra:
        ax.axhline(
            scores.extra["calibration_ppl"], color="grey", ls="--", lw=1, label="calibration ppl, all units"
        )
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def allocation_chart(plan, path: str | Path) -> Path | None:
    """Per-block mean target sparsity of a sparsity plan, with the target as a line."""
    plt = pyplot()
    if plt is None:
        return None
    path = Path(path)
    layers = plan.layers
    blocks: dict[int, list[float]] = {}
    for name, v in layers.items():
        blocks.setdefault(int(name.split(".")[0]), []).append(v)
    xs = sorted(blocks)
    ys = [sum(blocks[b]) / len(blocks[b]) for b in xs]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(xs) + 2), 3.6))
    ax.bar(xs, ys, color="#1f77b4")
    ax.axhline(plan.params["target"], color="grey", ls="--", lw=1, label=f"target {plan.params['target']}")
    ax.set_xlabel("block")
    ax.set_ylabel("sparsity")
    ax.set_ylim(0, 1)
    ax.set_title(f"{plan.model['name']}: {plan.method} allocation for {plan.pruner}", fontsize=9)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plan_chart(plan, path: str | Path) -> Path | None:
    """The chart of a plan: importance with the removed units (depth), or the allocation (sparsity)."""
    if plan.kind == "sparsity":
        return allocation_chart(plan, path)
    if plan.kind != "depth" or not plan.scores:
        return None
    from ..scorers.base import Scores

    L = plan.num_blocks
    units = (
        [str(i) for i in range(L)]
        if plan.unit == "block"
        else [f"{i}.{p}" for i in range(L) for p in ("attn", "mlp")]
    )
    scores = Scores(
        method=plan.method,
        unit=plan.unit,
        units=units,
        importance=plan.scores,
        model=plan.model,
        params=plan.params,
        calibration=plan.calibration,
        seconds=0.0,
    )
    return importance_chart(scores, path, removed=plan.remove)


def loss_chart(history: dict, path: str | Path, title: str = "recovery") -> Path | None:
    """Training loss per optimizer step (and its running mean), against tokens seen."""
    plt = pyplot()
    if plt is None or not history.get("loss"):
        return None
    loss = history["loss"]
    k = max(1, len(loss) // 20)
    smooth = [
        sum(loss[max(0, i - k + 1) : i + 1]) / len(loss[max(0, i - k + 1) : i + 1]) for i in range(len(loss))
    ]
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    ax.plot(history["step"], loss, color="#1f77b4", alpha=0.35, lw=1, label="loss per step")
    ax.plot(history["step"], smooth, color="#1f77b4", lw=2, label=f"mean of {k} steps")
    if history.get("kd"):  # distillation: its KL and the LM loss of the same tokens, both logged
        ax.plot(history["step"], history["kd"], color="#d62728", lw=1, label="KD (KL to the teacher)")
        ax.plot(history["step"], history["lm"], color="#2ca02c", lw=1, label="LM loss")
    ax.set_xlabel(f"step ({history['tokens'][-1]:,} tokens in all)")
    ax.set_ylabel("training loss (nats / token)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
