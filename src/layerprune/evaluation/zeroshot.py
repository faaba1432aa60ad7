"""Zero-shot (or few-shot) multiple-choice accuracy with lm-eval, on the model in memory.

The harness is lm-eval's own (`simple_evaluate` on `HFLM(pretrained=<the loaded model>)`): a pruned model
is measured as it stands, without a round trip through disk. Two kinds of task:

- local tasks, shipped with layerprune and run offline: the fixture's, built from its held-out text
  (models/fixture/tasks/*.jsonl, see recipes/fixture/tasks.py). Their lm-eval configs are made here,
  with the absolute path of the installed files;
- lm-eval's standard tasks (any name lm-eval knows), which download their data sets, so need a network.

Aliases: `fixture` = every local task; `commonsense` = the 7 tasks of the depth-pruning papers.
The headline metric of a task ("metric" in the result; "mean" averages them) is acc_norm for hellaswag,
arc_challenge and openbookqa, acc otherwise, the convention of the depth-pruning papers' tables.

The dense fixture, all 500 examples of each bundled task, zero-shot (chance 0.25):
fixture_kjv acc 0.436 +- 0.022, fixture_wordnet 0.416 +- 0.022, fixture_pydoc 0.328 +- 0.021.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..errors import LayerpruneError

LOCAL_DIR = Path(__file__).resolve().parents[1] / "models" / "fixture" / "tasks"
LOCAL_VERSION = 1.0  # bump when a shipped task file or its config changes
COMMONSENSE = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
NORMALISED = frozenset({"hellaswag", "arc_challenge", "openbookqa"})  # headline metric acc_norm
_TRUE = ("1", "true", "yes", "on")


def local_tasks() -> dict[str, Path]:
    """The bundled offline tasks: name -> JSONL file (absolute, wherever layerprune is installed)."""
    return {p.stem: p for p in sorted(LOCAL_DIR.glob("*.jsonl"))}


def _local_list() -> str:
    return ", ".join(local_tasks()) or "none (reinstall layerprune)"


def _names(tasks: str | Sequence[str]) -> list[str]:
    items = tasks.split(",") if isinstance(tasks, str) else [n for t in tasks for n in str(t).split(",")]
    names: list[str] = []
    for item in (n.strip() for n in items):
        if not item:
            continue
        aliases = {"fixture": list(local_tasks()), "commonsense": list(COMMONSENSE)}
        names += [n for n in aliases.get(item, [item]) if n not in names]
    if not names:
        raise LayerpruneError(
            f"no task given; pass task names or an alias (fixture, commonsense): {_local_list()}"
        )
    return names


def _offline_env() -> bool:
    return any(os.environ.get(v, "0").lower() in _TRUE for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def offline() -> bool:
    """No hub datasets: HF_DATASETS_OFFLINE / HF_HUB_OFFLINE set, or huggingface.co unreachable."""
    from ..models.loading import hub_offline

    return _offline_env() or hub_offline()


@functools.lru_cache(maxsize=2)
def _task_manager(standard: bool):
    """lm-eval's task index (building it for the standard tasks reads every YAML it ships: seconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=standard)


def resolve_tasks(tasks: str | Sequence[str]) -> list[str]:
    """Task names, aliases expanded, checked: a LayerpruneError names the fix. Cheap for local tasks."""
    names = _names(tasks)
    local = local_tasks()
    remote = [n for n in names if n not in local]
    if not remote:
        return names
    if offline():
        n = remote[0]
        if n in COMMONSENSE:
            raise LayerpruneError(
                f"task '{n}' needs a network and none is reachable; the local tasks are: {_local_list()}"
            )
        raise LayerpruneError(
            f"task '{n}' is not a local task, and lm-eval's tasks need a network (none is reachable); "
            f"the local tasks are: {_local_list()}"
        )
    with _quiet_logs(True):
        known = set(_task_manager(True).all_tasks)
    for n in remote:
        if n not in known:
            raise LayerpruneError(
                f"unknown task '{n}': neither a local task nor an lm-eval task; the local tasks are: "
                f"{_local_list()} (aliases: fixture, commonsense)"
            )
    return names


def local_config(name: str) -> dict:
    """The lm-eval config of a bundled task: a 4-way (say) choice of the continuation of `context`."""
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(local_tasks()[name])}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "context",  # a column name: the text as it stands
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "target_delimiter": "",  # the context carries its own trailing space or newline
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": LOCAL_VERSION},
    }


@contextlib.contextmanager
def _quiet_logs(quiet: bool) -> Iterator[None]:
    """lm-eval (and datasets) log at INFO / WARNING on every run; keep errors only when quiet."""
    if not quiet:
        yield
        return
    loggers = [logging.getLogger(n) for n in ("lm_eval", "datasets", "transformers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def _no_bars(quiet: bool) -> Iterator[None]:
    """lm-eval draws tqdm bars whatever it is told (request building, tokenising, scoring)."""
    if not quiet:
        yield
        return
    import importlib

    from tqdm import tqdm

    modules = [
        importlib.import_module(m)
        for m in ("lm_eval.api.task", "lm_eval.api.model", "lm_eval.models.huggingface")
    ]
    saved = [m.tqdm for m in modules]

    def silent(*args, **kwargs):
        return tqdm(*args, **{**kwargs, "disable": True})

    for m in modules:
        m.tqdm = silent
    import datasets

    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        for m, t in zip(modules, saved):
            m.tqdm = t
        if bars:
            datasets.enable_progress_bars()


def _set_offline() -> None:
    """Before lm-eval imports datasets (and after, for a process that already imported it)."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    if "datasets.config" in sys.modules:
        cfg = sys.modules["datasets.config"]
        cfg.HF_HUB_OFFLINE = cfg.HF_DATASETS_OFFLINE = True


def _stderr(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None  # lm-eval gives "N/A" for 1 sample


def run_lm_eval(
    lm,
    names: Sequence[str],
    limit: int | None = None,
    batch_size: int = 8,
    num_fewshot: int = 0,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """lm-eval's own output (results, versions, n-shot, n-samples, samples) for checked task names."""
    local = local_tasks()
    standard = any(n not in local for n in names)
    if _offline_env():
        _set_offline()
    if limit is not None and limit < 1:
        raise LayerpruneError(f"limit {limit} must be a whole number of examples, at least 1")
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise LayerpruneError(
            "zero-shot evaluation needs lm-eval; install it with `pip install 'layerprune[zeroshot]'`"
        ) from None

    quiet = not progress
    with _quiet_logs(quiet), _no_bars(quiet):
        model = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=batch_size)
        specs = [local_config(n) if n in local else n for n in names]
        return lm_eval.simple_evaluate(
            model=model,
            tasks=specs,
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=_task_manager(standard),
            log_samples=True,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )


def zeroshot(
    lm,
    tasks: str | Sequence[str],
    limit: int | None = None,
    batch_size: int = 8,
    num_fewshot: int = 0,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Accuracy of a loaded model (`layerprune.load(...)`, pruned or not) on multiple-choice tasks.

    `tasks`: names or a comma string; `fixture` = the bundled offline tasks, `commonsense` = boolq, piqa,
    hellaswag, winogrande, arc_easy, arc_challenge, openbookqa (need a network). `limit`: the first N
    examples of each task. Returns {"tasks": {name: {acc, acc_stderr, acc_norm, acc_norm_stderr,
    num_choices, chance, samples, version, num_fewshot, metric}}, "mean", "limit", "lm_eval_version",
    "seconds"}; "metric" names the headline metric of the task, "mean" averages those.
    """
    import lm_eval

    lm.adapter.require_in_memory("zero-shot evaluation (lm-eval runs whole forwards)")
    names = resolve_tasks(tasks)
    t0 = time.perf_counter()
    out = run_lm_eval(lm, names, limit, batch_size, num_fewshot, seed, progress)
    # the tasks as given, then the leaves of any lm-eval group named (a group has no samples of its own)
    leaves = [n for n in names if n in out["samples"]] + [n for n in out["samples"] if n not in names]
    per_task = {leaf: _summary(leaf, out) for leaf in leaves}
    headline = [t[t["metric"]] for t in per_task.values() if t.get(t["metric"]) is not None]
    return {
        "tasks": per_task,
        "mean": statistics.fmean(headline) if headline else None,
        "limit": limit,
        "lm_eval_version": getattr(lm_eval, "__version__", None),
        "seconds": time.perf_counter() - t0,
    }


def _summary(name: str, out: dict) -> dict:
    r = out["results"][name]
    if "acc,none" not in r:
        raise LayerpruneError(f"task '{name}' reports no accuracy; only multiple-choice tasks are supported")
    samples = out["samples"][name]
    counts = [len(s["resps"]) for s in samples]  # one log-likelihood request per choice
    num_choices = statistics.mode(counts) if counts else None
    d = {
        "acc": float(r["acc,none"]),
        "acc_stderr": _stderr(r.get("acc_stderr,none")),
    }
    if "acc_norm,none" in r:
        d["acc_norm"] = float(r["acc_norm,none"])
        d["acc_norm_stderr"] = _stderr(r.get("acc_norm_stderr,none"))
    metric = "acc_norm" if name in NORMALISED and "acc_norm" in d else "acc"
    return {
        **d,
        "num_choices": num_choices,
        # the accuracy of a uniform guess; 1 / num_choices when every example has as many choices
        "chance": statistics.fmean(1 / c for c in counts) if counts else None,
        "samples": len(samples),
        "version": out["versions"].get(name),
        "num_fewshot": out.get("n-shot", {}).get(name),
        "metric": metric,
    }
