"""LLM operators for the evolutionary search (Self-Pruner): a chat model proposes the initial population,
the parents, the crossover children and the mutants, through any OpenAI-compatible endpoint (the
official `openai` client: `pip install 'layerprune[search]'`).

Each prompt states the task (L blocks, target mean rate beta weighted by parameters, the bounds, lower
fitness is better), shows the current population sorted by fitness and asks for strict JSON only:
{"children": [[r_0, ..., r_{L-1}], ...]} or {"parents": [[i, j], ...], "mutants": [k, ...]}.

Every reply is validated. A proposal out of the bounds or off the target mean is repaired (`repair`);
one that cannot be read (bad JSON, wrong length, not numbers) or whose key was already seen is replaced
by the classic operator's child. Each event is counted in the run's stats:

    requests            requests sent
    request_failed      a request after the first failed (replaced by the classic operator)
    invalid_json        a reply that is not the JSON object asked for
    wrong_count         a reply with more or fewer entries than asked (extra ignored, missing replaced)
    wrong_shape         an entry that is not a list
    wrong_length        a rate list whose length is not L
    not_numbers         a rate list with something other than finite numbers
    out_of_range_repaired  rates outside [p_min, p_max], clipped and rescaled
    mean_repaired       rates within the bounds but off the target mean, rescaled
    invalid_parents     a parent index that is not an index of the population
    duplicate_replaced  a valid proposal whose key was already seen (counted by the driver)
    llm_children        proposals used
    classic_fallback    children made by the classic operator in place of a proposal

The FIRST request failing stops the run with an error naming the fix (no silent classic run); later
failures fall back to the classic operator for that request and are counted.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ...errors import LayerpruneError
from .constraint import TOLERANCE, repair, weighted_mean
from .llm_prompts import SYSTEM, Prompts, _is_index, _is_number, _strip

STATS = (
    "requests",
    "request_failed",
    "invalid_json",
    "wrong_count",
    "wrong_shape",
    "wrong_length",
    "not_numbers",
    "out_of_range_repaired",
    "mean_repaired",
    "invalid_parents",
    "duplicate_replaced",
    "llm_children",
    "classic_fallback",
)
MAX_TRANSCRIPT_CHARS = 4000


@dataclass
class LLMConfig:
    """An OpenAI-compatible chat endpoint. The API key is read from the environment variable key_env
    ("none" when unset, which local servers accept)."""

    url: str
    model: str
    key_env: str = "OPENAI_API_KEY"
    temperature: float = 0.7
    timeout: float = 120.0
    max_retries: int = 2


def as_config(config: Any) -> LLMConfig:
    """An LLMConfig from any object with url and model (and optionally the other fields)."""
    if isinstance(config, LLMConfig):
        return config
    if isinstance(config, Mapping):
        config = type("Config", (), dict(config))
    if not getattr(config, "url", None) or not getattr(config, "model", None):
        raise LayerpruneError(
            "the LLM operators need an endpoint and a model: give --llm-url and --llm-model"
        )
    fields = ("key_env", "temperature", "timeout", "max_retries")
    return LLMConfig(
        config.url, config.model, **{k: getattr(config, k) for k in fields if hasattr(config, k)}
    )


NO_OPENAI = (
    "the LLM operators need the openai package: pip install 'layerprune[search]' "
    "(or use the classic operators: --operators classic)"
)


def check_endpoint(config: Any, timeout: float = 3.0) -> None:
    """What can be known of the endpoint before any work: the openai package is installed and the URL's
    host:port accepts a connection (the first request still says whether it speaks the API)."""
    import socket
    from urllib.parse import urlparse

    config = as_config(config)
    try:
        import openai  # noqa: F401
    except ImportError:
        raise LayerpruneError(NO_OPENAI) from None
    url = urlparse(config.url)
    try:
        host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    except ValueError:  # a port that is not a number
        host = None
    if url.scheme not in ("http", "https") or not host:
        raise LayerpruneError(f"--llm-url {config.url} must look like http://host:port/v1")
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise LayerpruneError(
            f"the LLM endpoint {config.url} is unreachable ({e.strerror or e}); check --llm-url (is the server "
            "running?) or use the classic operators (--operators classic)"
        ) from None


Proposal = tuple[list[float] | None, str | None]  # repaired rates or None, and why it is None


class Chat:
    """Requests to the endpoint, with the failure policy above, and a transcript of the replies: what
    every LLM operator (rates here, levels in llm_levels.py) sends its prompts through."""

    def __init__(self, config: LLMConfig, stats: Counter, client: Any = None, system: str = SYSTEM):
        self.config = as_config(config)
        self.stats, self.system = stats, system
        self._client = client
        self._sent = 0
        self.transcript: list[dict] = []

    def client(self):
        if self._client is None:
            try:
                from openai import OpenAI
            except ImportError:
                raise LayerpruneError(NO_OPENAI) from None
            self._client = OpenAI(
                base_url=self.config.url,
                api_key=os.environ.get(self.config.key_env, "none"),
                timeout=self.config.timeout,
                max_retries=self.config.max_retries,
            )
        return self._client

    def ask(self, purpose: str, prompt: str) -> str | None:
        """The reply's text, or None after a failed request (not the first: that one raises).
        Under torchrun only rank 0 talks to the endpoint; every rank gets its reply."""
        from ...distributed import group

        return group().from_main(lambda: self._ask(purpose, prompt))

    def _ask(self, purpose: str, prompt: str) -> str | None:
        client = self.client()
        import openai

        first = self._sent == 0
        self._sent += 1
        self.stats["requests"] += 1
        try:
            response = client.chat.completions.create(
                model=self.config.model,
                messages=[{"role": "system", "content": self.system}, {"role": "user", "content": prompt}],
                temperature=self.config.temperature,
            )
            text = response.choices[0].message.content or ""
        except openai.APIConnectionError as e:  # also timeouts
            if first:
                raise LayerpruneError(
                    f"the LLM endpoint {self.config.url} is unreachable ({e}); "
                    "check --llm-url or use the classic operators (--operators classic)"
                ) from None
            return self._failed(purpose, e)
        except openai.OpenAIError as e:
            if first:
                raise LayerpruneError(
                    f"the LLM endpoint {self.config.url} refused the first request ({e}); check --llm-url, "
                    f"--llm-model and the key in ${self.config.key_env}, or use the classic operators "
                    "(--operators classic)"
                ) from None
            return self._failed(purpose, e)
        except (AttributeError, IndexError, TypeError) as e:  # a 200 reply not shaped as a chat completion
            if first:
                raise LayerpruneError(
                    f"the endpoint {self.config.url} did not answer as an OpenAI-compatible chat API ({e}); "
                    "check --llm-url (it usually ends in /v1) or use the classic operators (--operators classic)"
                ) from None
            return self._failed(purpose, e)
        self.transcript.append({"purpose": purpose, "reply": text[:MAX_TRANSCRIPT_CHARS]})
        return text

    def _failed(self, purpose: str, error: Exception) -> None:
        self.stats["request_failed"] += 1
        self.transcript.append({"purpose": purpose, "error": str(error)[:MAX_TRANSCRIPT_CHARS]})
        return None

    def drain_transcript(self) -> list[dict]:
        out, self.transcript = self.transcript, []
        return out


class LLMOperators:
    def __init__(
        self,
        config: LLMConfig,
        *,
        L: int,
        beta: float,
        weights: Sequence[float],
        p_min: float,
        p_max: float,
        stats: Counter,
        client: Any = None,
    ):
        self.chat = Chat(config, stats, client)
        self.config = self.chat.config
        self.L, self.beta, self.p_min, self.p_max = L, beta, p_min, p_max
        self.weights = list(weights)
        self.stats = stats
        self.prompts = Prompts(L, beta, self.weights, p_min, p_max)

    def ask(self, purpose: str, prompt: str) -> str | None:
        return self.chat.ask(purpose, prompt)

    def drain_transcript(self) -> list[dict]:
        return self.chat.drain_transcript()

    # --- validation

    def _parse(self, text: str | None, field: str) -> list | None:
        if text is None:
            return None
        try:
            obj = json.loads(_strip(text))
        except ValueError:
            self.stats["invalid_json"] += 1
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get(field), list):
            self.stats["invalid_json"] += 1
            return None
        return obj[field]

    def _count(self, items: list | None, n: int) -> list:
        if items is None:
            return [None] * n
        if len(items) != n:
            self.stats["wrong_count"] += 1
        return (items + [None] * n)[:n]

    def check(self, rates: Any) -> Proposal:
        """Validate one proposed rate list; repair it when it is readable but infeasible."""
        if rates is None:
            return None, "missing"
        if not isinstance(rates, list):
            self.stats["wrong_shape"] += 1
            return None, "wrong_shape"
        if len(rates) != self.L:
            self.stats["wrong_length"] += 1
            return None, "wrong_length"
        if not all(_is_number(r) for r in rates):
            self.stats["not_numbers"] += 1
            return None, "not_numbers"
        rates = [float(r) for r in rates]
        if any(r < self.p_min or r > self.p_max for r in rates):
            self.stats["out_of_range_repaired"] += 1
        elif abs(weighted_mean(rates, self.weights) - self.beta) > TOLERANCE:
            self.stats["mean_repaired"] += 1
        return repair(rates, self.beta, self.weights, self.p_min, self.p_max), None

    def _children(self, purpose: str, prompt: str, n: int) -> list[Proposal]:
        if n == 0:
            return []
        text = self.ask(purpose, prompt)
        items = self._parse(text, "children")
        why = "request_failed" if text is None else "invalid_json"
        return [self.check(r) if items is not None else (None, why) for r in self._count(items, n)]

    # --- the four operators

    def initial(self, n: int, seeds: Mapping[str, Sequence[float]]) -> list[Proposal]:
        return self._children("initial", self.prompts.initial(n, seeds), n)

    def select(
        self, pop: Sequence, crossovers: int, mutations: int
    ) -> tuple[list[tuple[int, int] | None], list[int | None]]:
        if crossovers == 0 and mutations == 0:
            return [], []
        n = len(pop)
        prompt = self.prompts.select(pop, crossovers, mutations)
        text = self.ask("select", prompt)
        pairs_raw = mutants_raw = None
        if text is not None:
            try:
                obj = json.loads(_strip(text))
            except ValueError:
                obj = None
            if (
                isinstance(obj, dict)
                and isinstance(obj.get("parents"), list)
                and isinstance(obj.get("mutants"), list)
            ):
                pairs_raw, mutants_raw = obj["parents"], obj["mutants"]
            else:
                self.stats["invalid_json"] += 1
        pairs: list[tuple[int, int] | None] = []
        for p in self._count(pairs_raw, crossovers) if pairs_raw is not None else [None] * crossovers:
            if isinstance(p, list) and len(p) == 2 and all(_is_index(i, n) for i in p):
                pairs.append((p[0], p[1]))
            else:
                if pairs_raw is not None and p is not None:
                    self.stats["invalid_parents"] += 1
                pairs.append(None)
        mutants: list[int | None] = []
        for m in self._count(mutants_raw, mutations) if mutants_raw is not None else [None] * mutations:
            if _is_index(m, n):
                mutants.append(m)
            else:
                if mutants_raw is not None and m is not None:
                    self.stats["invalid_parents"] += 1
                mutants.append(None)
        return pairs, mutants

    def crossover(self, pop: Sequence, pairs: Sequence[tuple[int, int]]) -> list[Proposal]:
        if not pairs:
            return []
        return self._children("crossover", self.prompts.crossover(pop, pairs), len(pairs))

    def mutate(self, pop: Sequence, mutants: Sequence[int]) -> list[Proposal]:
        if not mutants:
            return []
        return self._children("mutation", self.prompts.mutate(pop, mutants), len(mutants))
