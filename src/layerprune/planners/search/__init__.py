"""Evolutionary search of per-block pruning rates (Self-Pruner), classic or LLM operators.

    from layerprune.planners.search import search, repair, plot_history, LLMConfig
    result = search(L, beta, weights, evaluate, key, seeds={"owl": owl_rates})

`LLMConfig` and the LLM operators need `pip install 'layerprune[search]'` only when used.
"""

from .constraint import DEFAULT_P_MAX, DEFAULT_P_MIN, check_bounds, repair, weighted_mean
from .evolution import SearchResult, plot_history, search
from .llm import LLMConfig, LLMOperators
from .operators import ClassicOperators

__all__ = [
    "DEFAULT_P_MAX",
    "DEFAULT_P_MIN",
    "ClassicOperators",
    "LLMConfig",
    "LLMOperators",
    "SearchResult",
    "check_bounds",
    "plot_history",
    "repair",
    "search",
    "weighted_mean",
]
