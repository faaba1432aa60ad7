"""Routing keyword options to the function that takes them, with an error for the ones it does not.

The CLI and the Python verbs accept the union of every method's options; each method states what
it takes in its signature. An option given to a method that does not use it is an error (a user who
sets --budget for `ppl` should learn that it has no effect), except for generic options such as
`batch_size` that some methods simply do not need.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable

from .errors import LayerpruneError

# Keyword names whose command-line flag is spelled differently.
FLAGS = {"lam": "--owl-lambda", "hyper_m": "--owl-m"}


def accepted(
    fn: Callable, options: dict, what: str, generic: Iterable[str] = (), flags: dict | None = None
) -> dict:
    """The options (not None) that `fn` takes by keyword; refuse the others unless generic."""
    params = inspect.signature(fn).parameters
    names = {n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    out, refused = {}, []
    for key, value in options.items():
        if value is None:
            continue
        if key in names:
            out[key] = value
        elif key not in generic:
            refused.append(key)
    if refused:
        names = {**FLAGS, **(flags or {})}
        given = ", ".join(names.get(k, "--" + k.replace("_", "-")) for k in sorted(refused))
        raise LayerpruneError(f"{what} does not use {given}; drop it")
    return out
