"""Independent evaluations spread over the processes of a `torchrun` job (torch.distributed).

Every rank runs the same program on its own replica of the model. Where a batch of independent
evaluations appears (layer masks of the Shapley game, leave-one-out candidates, SLEB steps, search
candidates), the evaluations that rank 0's store does not already hold are cut into rounds and each
round into one contiguous share per rank; every rank evaluates its share and the results are
gathered to all ranks, so that every rank takes the same next step. Only scalars cross ranks: a
known flag and a value per evaluation when rank 0 reads its store, one float64 per evaluation when
results are gathered (the LLM operators' answers, text, are the one exception).

Rank 0 owns the evaluation store and every output file; it commits each round as soon as it is
gathered, so a job that loses a rank stops with a clear message and the same command, run again
with any number of processes, resumes from the store.

Without torchrun (WORLD_SIZE unset or 1) this is a group of one and costs nothing.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .errors import LayerpruneError

# Evaluations per rank per round: larger rounds share more trie prefixes, smaller ones commit to the
# store more often (a lost rank costs at most one round).
ROUND = int(os.environ.get("LAYERPRUNE_DIST_ROUND", "32"))
TIMEOUT_S = float(os.environ.get("LAYERPRUNE_DIST_TIMEOUT", "1800"))


class Group:
    """The ranks of this job (a group of one outside torchrun)."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0, device: str = "cpu"):
        self.rank, self.world, self.local_rank = rank, world, local_rank
        self.device = torch.device(device)  # where collective tensors live: cuda for NCCL
        self.evaluations = 0  # evaluations this rank computed for a gather
        self.collectives = 0  # collective calls made
        self.scalars = 0  # numbers this rank received through them (padding included)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def share(self, n: int, rank: int | None = None) -> tuple[int, int]:
        """The contiguous slice [start, stop) of n items that `rank` (default: this one) evaluates."""
        r = self.rank if rank is None else rank
        base, extra = divmod(n, self.world)
        start = r * base + min(r, extra)
        return start, start + base + (1 if r < extra else 0)

    def _run(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except (RuntimeError, ValueError) as e:  # gloo / NCCL: a peer closed its connection or timed out
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise LayerpruneError(
                f"rank {self.rank} lost contact with the other ranks during {what} ({first}); "
                "another rank died or was killed: rerun the same command (any number of processes) "
                "to resume from rank 0's store"
            ) from None

    def broadcast_known(self, n: int, known: dict[int, float]) -> dict[int, float]:
        """Rank 0's {index: value} of n evaluations, on every rank."""
        if not self.active:
            return known
        import torch.distributed as dist

        flags = torch.zeros(n, dtype=torch.uint8)
        values = torch.zeros(n, dtype=torch.float64)
        if self.main:
            for i, v in known.items():
                flags[i], values[i] = 1, v
        flags, values = flags.to(self.device), values.to(self.device)
        self._run("the store lookup", lambda: (dist.broadcast(flags, 0), dist.broadcast(values, 0)))
        flags, values = flags.cpu(), values.cpu()
        self.collectives += 2
        self.scalars += 2 * n
        return {i: float(values[i]) for i in range(n) if flags[i]}

    def gather(self, local: Sequence[float], n: int) -> list[float]:
        """Every rank's share of n values (this rank's are `local`), in order, on every rank."""
        if not self.active:
            return [float(v) for v in local]
        import torch.distributed as dist

        width = -(-n // self.world)
        mine = torch.full((width,), float("nan"), dtype=torch.float64)
        mine[: len(local)] = torch.tensor([float(v) for v in local], dtype=torch.float64)
        mine = mine.to(self.device)
        parts = [torch.empty(width, dtype=torch.float64, device=self.device) for _ in range(self.world)]
        self._run("the gather of results", lambda: dist.all_gather(parts, mine))
        parts = [p.cpu() for p in parts]
        self.evaluations += len(local)
        self.collectives += 1
        self.scalars += width * self.world
        out: list[float] = []
        for r, part in enumerate(parts):
            start, stop = self.share(n, r)
            out.extend(float(v) for v in part[: stop - start])
        return out

    def from_main(self, fn: Callable[[], Any]) -> Any:
        """fn() run on rank 0 only; its result (or its LayerpruneError) on every rank."""
        if not self.active:
            return fn()
        import torch.distributed as dist

        box: list[Any] = [None]
        if self.main:
            try:
                box[0] = ("ok", fn())
            except LayerpruneError as e:
                box[0] = ("error", str(e))
        self._run("a broadcast from rank 0", lambda: dist.broadcast_object_list(box, 0))
        self.collectives += 1
        kind, value = box[0]
        if kind == "error":
            raise LayerpruneError(value)
        return value


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of `t` over the ranks, in place (calibration statistics split by data)."""
    g = group()
    if not g.active:
        return t
    import torch.distributed as dist

    moved = t.to(g.device)
    g._run("the reduction of calibration statistics", lambda: dist.all_reduce(moved))
    if moved is not t:
        t.copy_(moved)
    g.collectives += 1
    g.scalars += t.numel()
    return t


_GROUP: Group | None = None


def world_from_env() -> tuple[int, int, int]:
    return (
        int(os.environ.get("RANK", "0")),
        int(os.environ.get("WORLD_SIZE", "1")),
        int(os.environ.get("LOCAL_RANK", "0")),
    )


def group() -> Group:
    """This job's group: under torchrun (WORLD_SIZE > 1) the process group is created on first use,
    NCCL when this rank has a GPU, gloo otherwise."""
    global _GROUP
    rank, world, local = world_from_env()
    if _GROUP is None or (_GROUP.rank, _GROUP.world) != (rank, world):
        device = "cpu"
        if world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                if "MASTER_ADDR" not in os.environ:
                    raise LayerpruneError(
                        "WORLD_SIZE > 1 but no rendezvous (MASTER_ADDR): start the job with torchrun"
                    )
                backend = os.environ.get("LAYERPRUNE_DIST_BACKEND") or (
                    "nccl" if torch.cuda.is_available() else "gloo"
                )
                if backend == "nccl":
                    torch.cuda.set_device(local % torch.cuda.device_count())
                dist.init_process_group(backend, timeout=datetime.timedelta(seconds=TIMEOUT_S))
            if dist.get_backend() == "nccl":
                device = f"cuda:{torch.cuda.current_device()}"
        _GROUP = Group(rank, world, local, device)
    return _GROUP


def is_main() -> bool:
    return group().main


def close() -> None:
    """End the job's group. With LAYERPRUNE_DIST_STATS=PATH each rank writes its counters to
    PATH.rank<N>.json first (bench/scale.py reads them)."""
    global _GROUP
    if _GROUP is not None and _GROUP.active:
        import json

        import torch.distributed as dist

        stats = os.environ.get("LAYERPRUNE_DIST_STATS")
        if stats:
            g = _GROUP
            doc = {"rank": g.rank, "world": g.world, "evaluations": g.evaluations,
                   "collectives": g.collectives, "scalars_received": g.scalars}  # fmt: skip
            with open(f"{stats}.rank{g.rank}.json", "w") as f:
                json.dump(doc, f)

        if dist.is_initialized():
            dist.destroy_process_group()
    _GROUP = None


def spread(
    keys: Sequence[Any],
    known: dict[Any, float],
    evaluate: Callable[[list[Any], Callable[[Any, float], None]], Sequence[float]],
    record: Callable[[Any, float], None],
) -> dict[Any, float]:
    """Evaluate every distinct key of `keys` that `known` lacks, spread over the ranks.

    `known`: what this rank's store holds (rank 0's counts; the others pass {}).
    `evaluate(share, on_value)` returns one value per key of the share and may call
    `on_value(key, value)` as each is known. `record(key, value)` sees every new value on every
    rank (rank 0 commits it to its store there): as soon as it is known in a group of one, round by
    round under torchrun. Returns all values by key."""
    g = group()
    unique = list(dict.fromkeys(keys))
    index = {k: i for i, k in enumerate(unique)}
    stored = g.broadcast_known(len(unique), {index[k]: v for k, v in known.items() if k in index})
    values = {unique[i]: v for i, v in stored.items()}
    missing = [k for k in unique if k not in values]
    if not g.active:
        if missing:
            for k, v in zip(missing, evaluate(missing, record)):
                values[k] = v
        return values
    step = ROUND * g.world
    for s in range(0, len(missing), step):
        round_ = missing[s : s + step]
        lo, hi = g.share(len(round_))
        local = list(evaluate(round_[lo:hi], lambda k, v: None)) if hi > lo else []
        for k, v in zip(round_, g.gather(local, len(round_))):
            values[k] = v
            record(k, v)
    return values
