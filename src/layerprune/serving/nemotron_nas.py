"""The DeciLM / Nemotron-NAS format's keys and arithmetic, in plain Python (no torch, no transformers).

NVIDIA's Puzzle checkpoints (Llama-3.1-Nemotron-51B, -Super-49B, -Ultra-253B) describe each block in
`block_configs`: `attention` {n_heads_in_group (KV heads = H / n_heads_in_group), no_op, ...} and
`ffn` {ffn_mult (MLP width `find_multiple(int(2 * ffn_mult * hidden / 3), 256)`), no_op, ...}. The
key sets below are those of the released config.json files; models/decilm.py writes them, and the
config class of `nemotron_nas_config` reads them.
"""

from __future__ import annotations

MODEL_TYPE = "nemotron-nas"
ARCHITECTURE = "DeciLMForCausalLM"
FFN_MULTIPLE = 256  # the engines round ffn_mult's width up to a multiple of this
# The per-block keys of NVIDIA's released checkpoints, with the values a plain block has.
ATTENTION_DEFAULTS = {
    "n_heads_in_group": None,
    "no_op": False,
    "num_sink_tokens": None,
    "replace_with_linear": False,
    "sparsify": None,
    "unshifted_sink": False,
    "use_prefill_window_in_sink_attention": False,
    "window_length": None,
}
FFN_DEFAULTS = {"ffn_mult": None, "no_op": False, "replace_with_linear": False, "sparsify": None}


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


def ffn_mult(width: int, hidden: int) -> float:
    return 3 * width / (2 * hidden)


def ffn_width(mult: float, hidden: int) -> int:
    """The MLP width the engines derive from ffn_mult."""
    return find_multiple(int(2 * mult * hidden / 3), FFN_MULTIPLE)


def heads_in_group_ok(n, heads: int) -> bool:
    """An attention entry's n_heads_in_group states whole KV groups: a positive integer (not a JSON
    boolean) that divides the query heads."""
    return isinstance(n, int) and not isinstance(n, bool) and n >= 1 and heads % n == 0


def ffn_mult_ok(m) -> bool:
    """An ffn entry's ffn_mult states a width: a positive number (not a JSON boolean)."""
    return isinstance(m, (int, float)) and not isinstance(m, bool) and m > 0


class BlockPart:
    """One block's `attention` or `ffn` entry, read as attributes (vLLM reads `block.attention.no_op`,
    `block.ffn.ffn_mult`) and written back as the same dict: exactly the released keys, the missing
    ones at a plain block's values. A key outside the released set is refused, as NVIDIA's own
    dataclasses and mlx-lm's refuse it: a misspelt `no_op` must not pass for a kept module."""

    def __init__(self, part: str, entry: dict, where: str = "block_configs"):
        defaults = ATTENTION_DEFAULTS if part == "attention" else FFN_DEFAULTS
        if not isinstance(entry, dict):
            raise ValueError(f"{where}.{part} must be an object, not {type(entry).__name__}")
        unknown = sorted(set(entry) - set(defaults))
        if unknown:
            raise ValueError(
                f"{where}.{part} has keys outside the nemotron-nas set: {', '.join(unknown)} "
                f"(known: {', '.join(sorted(defaults))})"
            )
        self.__dict__.update({**defaults, **entry})

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def __eq__(self, other) -> bool:
        return isinstance(other, BlockPart) and self.__dict__ == other.__dict__

    def __repr__(self) -> str:
        return f"BlockPart({self.__dict__})"


class BlockConfig:
    """One `block_configs` entry: `.attention` and `.ffn`."""

    def __init__(self, entry, where: str = "block_configs"):
        if isinstance(entry, BlockConfig):
            entry = entry.to_dict()
        if not isinstance(entry, dict) or set(entry) != {"attention", "ffn"}:
            keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
            raise ValueError(f"{where} must have exactly 'attention' and 'ffn', not {keys}")
        self.attention = BlockPart("attention", entry["attention"], where)
        self.ffn = BlockPart("ffn", entry["ffn"], where)

    def to_dict(self) -> dict:
        return {"attention": self.attention.to_dict(), "ffn": self.ffn.to_dict()}

    def __eq__(self, other) -> bool:
        return isinstance(other, BlockConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"BlockConfig({self.to_dict()})"


def parse_blocks(entries) -> list[BlockConfig]:
    if not isinstance(entries, (list, tuple)):
        raise ValueError(f"block_configs must be a list, one entry per layer, not {type(entries).__name__}")
    return [BlockConfig(e, f"block_configs[{i}]") for i, e in enumerate(entries)]
