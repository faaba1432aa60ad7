"""Under torchrun: what a multi-process run may spread over the ranks, and the rank set-up."""

from __future__ import annotations

import os
import signal
import sys

from ..errors import LayerpruneError

SPREAD_COMMANDS = ("score", "plan")  # what torchrun spreads over ranks
SPREAD_METHODS = ("ppl", "sleb", "shapley")  # scorers made of independent mask evaluations


def prepare(args) -> None:
    """Under torchrun: refuse what has nothing to spread; ranks other than 0 print and write nothing."""
    from ..distributed import group, world_from_env

    rank, world, _ = world_from_env()
    if world <= 1:
        return
    if args.command == "apply":
        from ..plans import Plan

        plan = Plan.load(args.plan)
        if plan.kind != "sparsity" or plan.pruner == "magnitude":
            raise LayerpruneError(
                "under torchrun apply splits the calibration of wanda / sparsegpt plans over the ranks; "
                f"this {plan.kind} plan has none to split: run it as one process"
            )
    elif args.command not in SPREAD_COMMANDS or (
        args.command == "score" and args.method not in SPREAD_METHODS
    ):
        what = f"score --method {args.method}" if args.command == "score" else args.command
        raise LayerpruneError(
            f"torchrun spreads the mask evaluations of score ({', '.join(SPREAD_METHODS)}) and plan, and the "
            f"calibration of apply (wanda, sparsegpt); {what} has none: run it as one process"
        )
    group()  # the rendezvous, before any model is loaded

    def stopped(signum, _frame):  # torchrun stops the other ranks when one fails
        raise LayerpruneError(
            f"rank {rank} was stopped (signal {signum}): another rank of this torchrun job failed or was "
            "killed; rerun the same command (any number of processes) to resume from rank 0's store"
        )

    signal.signal(signal.SIGTERM, stopped)
    if rank != 0:
        args.quiet, args.no_plot = True, True
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 -- for the life of this process
