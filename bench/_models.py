"""The pruned SmolLM2 models several benches share, made once into bench/work/models/ (kept; delete a folder
to redo it) under a file lock, so that two benches asking at once wait for one build:

- `deploy_search(target)`: the deployable searched width plan (`--allocation search --deploy decilm`,
  Wanda-sp on 16 x 512 tokens of fixture:val, seed 0) with a short search: the initial population of 30
  (the heuristic allocations among them) and SEARCH_ITERATIONS generations of 20 offspring. The default 20
  generations cost ~1,265 s a target on a quiet core here (serve.json search-30); bench/recover.py,
  bench/frontier.py and bench/engines.py measure the same folder.
- `depth_search(count)`: the blocks the depth search chose (search.json smollm2 depth-N-fit512, 32 x 512
  fitness windows), where it ran for that count.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import time
from pathlib import Path

import layerprune as lp

HERE = Path(__file__).resolve().parent
WORK = HERE / "work" / "models"
DENSE = "smollm2"
CALIB = "fixture:val"
SEARCH_ITERATIONS = 2


@contextlib.contextmanager
def _locked(key: str):
    WORK.mkdir(parents=True, exist_ok=True)
    with open(WORK / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield WORK / key


def deploy_search(target: float, dense: str = DENSE) -> tuple[Path, str]:
    """(folder, how it was made) of the deployable searched width plan at `target` of block parameters."""
    key = f"deploy-search-{round(target * 100)}"
    with _locked(key) as folder:
        if not (folder / "report.json").is_file():
            lm = lp.load(dense, dtype="float32", quiet=True)
            calib = lp.calibration(lm, CALIB, samples=16, seqlen=512)
            t0 = time.perf_counter()
            plan = lp.plan(lm, width=target, calib=calib, allocation="search", deploy="decilm", progress=False,
                           iterations=SEARCH_ITERATIONS, store=str(WORK / f"{key}.store.db"))  # fmt: skip
            seconds = time.perf_counter() - t0
            report = lp.apply(lm, plan, calib, progress=False)
            lp.export(lm, folder, plan, {"pruning": report, "plan_seconds": seconds}, overwrite=True)
    how = (f"width {round(target * 100)} %, searched allocation, --deploy decilm, Wanda-sp on 16 x 512 of "
           f"{CALIB}; short search: population 30, {SEARCH_ITERATIONS} generations (bench/_models.py)")  # fmt: skip
    return folder, how


def depth_search_plan(lm, count: int):
    """A DepthPlan removing the depth search's best `count` blocks of `lm` (search.json), or None."""
    from layerprune.plans import DepthPlan
    from layerprune.provenance import stamp
    from layerprune.scorers.run import model_info

    blocks = depth_search_blocks(count)
    if not blocks:
        return None
    return DepthPlan(model=model_info(lm), method="search", remove=blocks, provenance=stamp(),
                     params={"remove": count, "from": f"bench/results/search.json smollm2 depth-{count}-fit512"})  # fmt: skip


def depth_search_blocks(count: int) -> list[str] | None:
    """The depth search's best `count` blocks of SmolLM2 (search.json depth-N-fit512), or None."""
    path = HERE / "results" / "search.json"
    if not path.is_file():
        return None
    row = json.loads(path.read_text()).get("smollm2", {}).get(f"depth-{count}-fit512")
    if not row:
        return None
    return [str(b) for b in row["blocks"]]
