"""LLM operators for the level searches (EvoPress's sparsity levels and depth sets): each generation
the chat model proposes the children, from the task, the parent and the best candidates evaluated
so far, through the same endpoint and failure policy as the width search (`Chat` in llm.py).

A sparsity child is a list of one integer level per unit; a depth child is the list of the unit
indices to remove. Every reply is validated; readable but infeasible proposals are repaired, the
rest replaced by the classic mutation of the parent. Counted in the run's stats:

    requests, request_failed, invalid_json, wrong_count, wrong_shape   as for the width search
    wrong_length          a level list whose length is not the number of units
    not_integers          an entry that is not an integer (level or unit index)
    out_of_range_repaired levels outside a unit's range (or a unit that may not be removed), moved in
    sum_repaired          levels whose sum is off (or a set of another size), fixed by random steps
    duplicate_replaced    a proposal equal to the parent or to another child
    llm_children          proposals used
    classic_fallback      children made by the classic mutation in place of a proposal
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Sequence
from typing import Any

from .llm import Chat, LLMConfig
from .llm_prompts import _strip

STATS = (
    "requests", "request_failed", "invalid_json", "wrong_count", "wrong_shape", "wrong_length", "not_integers",
    "out_of_range_repaired", "sum_repaired", "duplicate_replaced", "llm_children", "classic_fallback",
)  # fmt: skip
SHOWN = 12  # evaluated candidates shown in a prompt, best first

SYSTEM = (
    "You are the variation operator of an evolutionary search over how to prune a large language model, "
    "layer by layer. Answer with one strict JSON object and nothing else: no prose, no markdown, no code fences."
)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class LevelLLM:
    """`as_set`: children are sets of removed units (depth), else level lists (sparsity)."""

    def __init__(self, config: LLMConfig, space, *, describe: str, as_set: bool, stats: Counter, client=None):
        self.chat = Chat(config, stats, client, system=SYSTEM)
        self.space, self.describe, self.as_set, self.stats = space, describe, as_set, stats

    # ---- prompts
    def _show(self, genome: Sequence[int]) -> str:
        if self.as_set:
            return json.dumps([u for u, v in enumerate(genome) if v])
        return json.dumps(list(genome))

    def prompt(self, n: int, parent, parent_value: float, evaluated: Sequence[tuple[tuple, float]]) -> str:
        sp = self.space
        if self.as_set:
            fixed = [u for u in range(sp.units) if sp.hi[u] == 0]
            shape = (
                f"A candidate is the JSON list of exactly {sp.total} distinct unit indices to remove, out of "
                f"{sp.units} units (0..{sp.units - 1})"
                + (f"; units {fixed} may not be removed" if fixed else "")
            )
            example = '{"children": [[i_1, ..., i_' + str(sp.total) + "], ...]}"
        else:
            ranges = ", ".join(f"[{a}, {b}]" for a, b in zip(sp.lo, sp.hi))
            shape = (
                f"A candidate is a JSON list of exactly {sp.units} integer levels, one per unit, unit u within its "
                f"range; the levels must sum to {sp.total}. Ranges, by unit: {ranges}"
            )
            example = '{"children": [[l_0, ..., l_' + str(sp.units - 1) + "], ...]}"
        shown = "\n".join(f"fitness {v:.6g}: {self._show(g)}" for g, v in evaluated[:SHOWN])
        return (
            f"Task: {self.describe}\n{shape}. Fitness: LOWER is better.\n"
            f"Parent (fitness {parent_value:.6g}): {self._show(parent)}\n"
            f"Best candidates evaluated so far:\n{shown}\n"
            f"Propose {n} new candidates, each a small change of the parent or a mix of good candidates, all "
            f"different from each other and from the parent. Reply with strict JSON only: {example} holding "
            f"exactly {n} lists."
        )

    # ---- validation
    def check(self, item: Any, rng: random.Random) -> tuple | None:
        sp = self.space
        if not isinstance(item, list):
            self.stats["wrong_shape"] += 1
            return None
        if not all(_is_int(v) for v in item):
            self.stats["not_integers"] += 1
            return None
        if self.as_set:
            chosen = {v for v in item if 0 <= v < sp.units and sp.hi[v] == 1}
            if len(chosen) != len(item):
                self.stats["out_of_range_repaired"] += 1
            g = [1 if u in chosen else 0 for u in range(sp.units)]
        else:
            if len(item) != sp.units:
                self.stats["wrong_length"] += 1
                return None
            g = [min(max(v, sp.lo[u]), sp.hi[u]) for u, v in enumerate(item)]
            if g != list(item):
                self.stats["out_of_range_repaired"] += 1
        if sum(g) != sp.total:
            self.stats["sum_repaired"] += 1
            while sum(g) > sp.total:
                g[rng.choice([u for u in range(sp.units) if g[u] > sp.lo[u]])] -= 1
            while sum(g) < sp.total:
                g[rng.choice([u for u in range(sp.units) if g[u] < sp.hi[u]])] += 1
        return tuple(g)

    def children(
        self, n: int, parent, parent_value: float, evaluated, rng: random.Random
    ) -> list[tuple | None]:
        """n proposals (None where the classic mutation must make the child)."""
        text = self.chat.ask("children", self.prompt(n, parent, parent_value, evaluated))
        items = None
        if text is not None:
            try:
                obj = json.loads(_strip(text))
                items = (
                    obj["children"]
                    if isinstance(obj, dict) and isinstance(obj.get("children"), list)
                    else None
                )
            except ValueError:
                items = None
            if items is None:
                self.stats["invalid_json"] += 1
        if items is None:
            return [None] * n
        if len(items) != n:
            self.stats["wrong_count"] += 1
        return [None if item is None else self.check(item, rng) for item in (items + [None] * n)[:n]]
