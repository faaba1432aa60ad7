"""ModelAdapter: the only code that knows where a model keeps its blocks, projections and norms.

Methods ask the adapter for blocks, the linear layers of a block by role, the attention / MLP parts,
and use its two operations on depth:
- `skip(mask)`: a context in which masked blocks (or attention / MLP parts) act as identity on the
  residual stream. The ModuleList entries are swapped for weightless stand-ins, nothing is copied,
  and everything is put back on exit. For evaluation without a KV cache.
- `remove_blocks(indices)`: delete blocks for good, re-number every `layer_idx` (the KV cache is
  indexed by it), and fix the config: `num_hidden_layers` and every per-layer list (`layer_types`,
  ...), so that `save_pretrained` writes a checkpoint that loads with plain transformers.
And it splits the forward at the output embedding, so that losses over the vocabulary can be taken a
chunk of tokens at a time (engine/vocab.py): `head_input(ids)` is what the model's own forward hands
its output embedding (the final norm and anything else the body does, run as the model runs it), and
`head_logits(h)` the logits the forward makes of it (the embedding, tied or not, then the scaling or
softcapping the architecture applies).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from ..errors import LayerpruneError
from ..registry import Unit
from .registry import BY_MODEL_TYPE, SUPPORTED, ArchSpec

# Config attributes that are lists but not one entry per layer.
_NOT_PER_LAYER = {"architectures", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens"}


def get_module(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(get_module(root, parent) if parent else root, leaf, new)


def spec_for(config) -> ArchSpec:
    spec = BY_MODEL_TYPE.get(getattr(config, "model_type", None))
    if spec is None:
        raise LayerpruneError(
            f"architecture '{getattr(config, 'model_type', '?')}' is not supported; supported: {SUPPORTED}"
        )
    return spec


class SkippedBlock(nn.Module):
    """Stands in for a block: returns the residual stream unchanged."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class ZeroBranch(nn.Module):
    """Stands in for an attention or MLP part: contributes nothing to the residual stream."""

    def __init__(self, out_features: int | None = None, returns_tuple: bool = False):
        super().__init__()
        self.out_features = out_features
        self.returns_tuple = returns_tuple

    def forward(self, *args, **kwargs):
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        if self.out_features is None:
            out = torch.zeros_like(x)
        else:
            out = x.new_zeros(*x.shape[:-1], self.out_features)
        return (out, None) if self.returns_tuple else out


class _HeadReached(Exception):
    """Raised by the head probe: the rest of the forward (the logits) is not wanted."""


class _HeadProbe(nn.Module):
    """Stands in for the output embedding: records its input and stops the forward."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self._head = [head]  # in a list: not a submodule
        self.hidden: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor:  # some forwards read lm_head.weight.dtype (Mamba)
        return self._head[0].weight

    def forward(self, hidden_states):
        self.hidden = hidden_states
        raise _HeadReached


class ModelAdapter:
    def __init__(self, model: nn.Module, spec: ArchSpec | None = None):
        self.model = model
        self.config = model.config
        self.spec = spec or spec_for(model.config)
        self.offload = None  # OffloadedBlocks when the blocks stay on disk (models/offload.py)

    def resident(self, i: int, modifies: bool = False):
        """A context in which block i's weights are on the compute device (a no-op unless the
        blocks are offloaded); `modifies`: the block's new values are kept when it leaves."""
        return self.offload.resident(i, modifies) if self.offload is not None else contextlib.nullcontext()

    def require_in_memory(self, what: str) -> None:
        """Refuse an offloaded model where a path needs every block at once."""
        if self.offload is not None:
            raise LayerpruneError(
                f"{what} needs the whole model in memory; load it without --max-memory "
                "(offloaded models support scoring, planning, every pruner, perplexity and export)"
            )

    # ---- structure -------------------------------------------------------------------------
    @property
    def blocks(self) -> nn.ModuleList:
        return get_module(self.model, self.spec.blocks)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def roles(self) -> list[str]:
        return list(self.spec.linears)

    def linears(self, i: int) -> dict[str, nn.Module]:
        """Block i's linear layers by role; those of a part replaced by a no-op are absent."""
        block = self.blocks[i]
        out = {}
        for role, path in self.spec.linears.items():
            try:
                out[role] = get_module(block, path)
            except AttributeError:
                if not any(isinstance(m, ZeroBranch) for m in block.modules()):
                    raise
        return out

    def layer_names(self) -> list[str]:
        """'block.role' for every prunable linear layer, block order then role order (q,k,v,o,...)."""
        return [f"{i}.{role}" for i in range(self.num_blocks) for role in self.roles]

    def layer(self, name: str) -> nn.Module:
        block, _, role = name.partition(".")
        return self.linears(int(block))[role]

    def weight(self, layer: nn.Module) -> torch.Tensor:
        """The weight of a linear layer as (out_features, in_features), a view of the parameter."""
        return layer.weight.T if self.spec.transposed_weights else layer.weight

    def norms(self, i: int) -> dict[str, nn.Module]:
        block = self.blocks[i]
        return {path: get_module(block, path) for path in self.spec.norms}

    def has_parts(self) -> bool:
        return self.spec.attention is not None and self.spec.mlp is not None

    def part(self, i: int, part: str) -> nn.Module:
        path = {"attn": self.spec.attention, "mlp": self.spec.mlp}[part]
        if path is None:
            raise LayerpruneError(f"{self.spec.name} blocks have no attention / MLP split; use --unit block")
        return get_module(self.blocks[i], path)

    def output_linear(self, i: int, part: str) -> nn.Module:
        """The linear layer that writes the attention or MLP output of block i into the residual."""
        self.part(i, part)  # raises for architectures without the split
        return self.linears(i)[self.spec.output_roles[part]]

    def units(self, granularity: str = "block") -> list[Unit]:
        if granularity == "block":
            return [Unit(i) for i in range(self.num_blocks)]
        if granularity == "module":
            if not self.has_parts():
                raise LayerpruneError(
                    f"{self.spec.name} blocks have no attention / MLP split; use --unit block"
                )
            return [Unit(i, p) for i in range(self.num_blocks) for p in ("attn", "mlp")]
        raise LayerpruneError(f"unknown unit '{granularity}'; use block or module")

    def unit_parameters(self, unit: Unit) -> list[tuple[str, nn.Parameter]]:
        """(name within the block, parameter) of a unit: a whole block, or a part with its norms."""
        params = list(self.blocks[unit.block].named_parameters())
        if unit.part == "block":
            return params
        if not self.has_parts():
            raise LayerpruneError(f"{self.spec.name} blocks have no attention / MLP split; use --unit block")
        if unit.part == "attn":
            modules = (self.spec.attention,)
        else:
            modules = self.spec.mlp_modules or (self.spec.mlp,)
        prefixes = tuple(m + "." for m in modules)
        prefixes += tuple(n + "." for n, part in self.spec.norms.items() if part == unit.part)
        return [(n, p) for n, p in params if n.startswith(prefixes)]

    def unit_params(self, unit: Unit) -> int:
        return sum(p.numel() for _, p in self.unit_parameters(unit))

    @property
    def context_length(self) -> int | None:
        return getattr(self.config, "max_position_embeddings", None)

    @property
    def default_bos(self) -> str:
        return "every" if self.spec.bos_every_window else "first"

    # ---- the output embedding -----------------------------------------------------------------
    @property
    def head(self) -> nn.Module | None:
        """The output embedding (tied to the input one or not), when the model lets it be swapped for
        the probe of `head_input`; None otherwise (use the model's own logits)."""
        get = getattr(self.model, "get_output_embeddings", None)
        head = get() if get is not None else None
        return head if head is not None and hasattr(self.model, "set_output_embeddings") else None

    @property
    def vocab_size(self) -> int:
        head = self.head
        rows = getattr(head, "out_features", None) if head is not None else None
        return int(rows or self.config.vocab_size)

    def head_input(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """[B, T, H]: the hidden states the model's forward passes its output embedding for these
        windows, the forward stopped there; None when it never reaches the embedding this way."""
        head = self.head
        if head is None:
            return None
        probe = _HeadProbe(head)
        self.model.set_output_embeddings(probe)
        try:
            with contextlib.suppress(_HeadReached):
                self.model(input_ids=input_ids, use_cache=False)
        finally:
            self.model.set_output_embeddings(head)
        return probe.hidden

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The float32 logits the model's forward makes of hidden states entering its output
        embedding (any leading shape): the embedding, then the architecture's scaling and softcapping,
        computed in float32 (the forward does them in the model's dtype: equal in float32)."""
        logits = self.head(hidden).float()
        spec, cfg = self.spec, self.config
        if spec.logit_scale_key is not None:
            logits = logits * float(getattr(cfg, spec.logit_scale_key))
        if spec.logit_divisor_key is not None:
            logits = logits / float(getattr(cfg, spec.logit_divisor_key))
        cap = getattr(cfg, spec.logit_softcap_key, None) if spec.logit_softcap_key is not None else None
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    # ---- masks -----------------------------------------------------------------------------
    def check_mask(self, mask: Sequence[int | bool], granularity: str = "block") -> list[bool]:
        n = len(self.units(granularity))
        keep = [bool(int(b)) for b in mask]
        if len(keep) != n:
            raise LayerpruneError(
                f"mask has {len(keep)} entries but the model has {n} {granularity} units; give one 0/1 per unit"
            )
        if granularity == "block" and not any(keep):
            raise LayerpruneError("mask removes every block; keep at least one (a 1 in the mask)")
        if granularity == "module" and not any(keep):
            raise LayerpruneError("mask removes every attention and MLP part; keep at least one")
        return keep

    @contextlib.contextmanager
    def skip(self, mask: Sequence[int | bool], granularity: str = "block") -> Iterator[None]:
        """Within the context, units whose mask entry is 0 are identity. No weight is copied."""
        keep = self.check_mask(mask, granularity)
        if granularity == "block":
            blocks = self.blocks
            saved = {i: blocks[i] for i, k in enumerate(keep) if not k}
            try:
                for i in saved:
                    blocks[i] = SkippedBlock()
                yield
            finally:
                for i, b in saved.items():
                    blocks[i] = b
            return
        units = self.units(granularity)
        off: dict[int, list[str]] = {}
        for unit, k in zip(units, keep):
            if not k:
                off.setdefault(unit.block, []).append(unit.part)
        with contextlib.ExitStack() as stack:
            for i, parts in off.items():
                stack.enter_context(self.zero_parts(i, parts))
            yield

    @contextlib.contextmanager
    def zero_parts(self, i: int, parts: Sequence[str]) -> Iterator[None]:
        """Within the context, the given parts ("attn", "mlp") of block i add nothing to the residual."""
        block = self.blocks[i]
        saved: list[tuple[str, nn.Module]] = []
        try:
            for part in parts:
                path = self._part_path(part)
                saved.append((path, get_module(block, path)))
                self._silence(i, part)
            yield
        finally:
            for path, original in reversed(saved):
                set_module(block, path, original)

    def silence_parts(self, units: Sequence[Unit]) -> None:
        """Replace parts by no-ops for good (used on load for checkpoints whose parts were removed)."""
        for u in units:
            if not isinstance(self.part(u.block, u.part), ZeroBranch):
                self._silence(u.block, u.part)

    def _part_path(self, part: str) -> str:
        self.units("module")  # raises for architectures without the split
        return self.spec.attention if part == "attn" else self.spec.mlp

    def _silence(self, i: int, part: str) -> None:
        original = self.part(i, part)
        if part == "attn":
            stand_in = ZeroBranch(returns_tuple=self.spec.attn_returns_tuple)
        else:  # an MLP module keeps the width; OPT's fc2 maps to the hidden size
            stand_in = ZeroBranch(out_features=getattr(original, "out_features", None))
        set_module(self.blocks[i], self._part_path(part), stand_in)

    # ---- widths (structured pruning) -----------------------------------------------------------
    def require_split(self) -> None:
        """Refuse width pruning of blocks without an attention / MLP split (Mamba)."""
        if not self.has_parts():
            raise LayerpruneError(
                f"{self.spec.name} blocks have no attention / MLP split: width pruning needs one; "
                "use depth pruning (--unit block) or sparsity instead"
            )

    def width_units(self, i: int) -> tuple[int, int]:
        """(KV groups, MLP channels) of block i: the units width pruning removes (models/width.py)."""
        self.require_split()
        return self.attn_heads(i)[1], self.mlp_channels(i)

    def _width_config(self, key: str | None):
        if not self.has_parts():
            raise LayerpruneError(
                f"{self.spec.name} blocks have no attention / MLP split: width pruning needs one"
            )
        return None if key is None else getattr(self.config, key, None)

    @property
    def num_heads(self) -> int:
        """Query heads per block, as the config states them (blocks of a width-pruned model may differ)."""
        return int(self._width_config(self.spec.heads_key))

    @property
    def num_kv_heads(self) -> int:
        kv = self._width_config(self.spec.kv_heads_key)
        return int(kv) if kv is not None else self.num_heads

    @property
    def head_dim(self) -> int:
        d = self._width_config(self.spec.head_dim_key)
        return int(d) if d is not None else self.config.hidden_size // self.num_heads

    @property
    def intermediate_size(self) -> int:
        n = self._width_config(self.spec.intermediate_key)
        return int(n) if n is not None else self.spec.intermediate_default * self.config.hidden_size

    def attn_heads(self, i: int) -> tuple[int, int]:
        """(query heads, KV heads) of block i, read from its weights (they may differ per block)."""
        lin = self.linears(i)
        d = self.head_dim
        heads = self.weight(lin[self.spec.output_roles["attn"]]).shape[1] // d
        qkv_rows = sum(self.weight(lin[r]).shape[0] for r in ("q", "k", "v", "qkv") if r in lin)
        return heads, (qkv_rows - heads * d) // (2 * d)

    def mlp_channels(self, i: int) -> int:
        """Intermediate channels of block i's MLP, read from its weights."""
        self._width_config(None)
        return self.weight(self.linears(i)[self.spec.output_roles["mlp"]]).shape[1]

    def set_weight(self, layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Replace a linear layer's weight, given as (out_features, in_features), and optionally its bias;
        the layer's feature counts follow (nn.Linear: in/out_features; GPT-2 Conv1D: nx/nf)."""
        stored = weight.T if self.spec.transposed_weights else weight
        grad = layer.weight.requires_grad
        layer.weight = nn.Parameter(stored.detach().contiguous(), requires_grad=grad)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().contiguous(), requires_grad=layer.bias.requires_grad)
        out_f, in_f = weight.shape
        for attr, value in (("out_features", out_f), ("in_features", in_f), ("nf", out_f), ("nx", in_f)):
            if hasattr(layer, attr):
                setattr(layer, attr, value)

    # ---- removal ---------------------------------------------------------------------------
    def remove_blocks(self, indices: Sequence[int]) -> None:
        """Delete blocks in place; the model then saves and reloads as a standard checkpoint."""
        L = self.num_blocks
        drop = sorted({int(i) for i in indices})
        if any(i < 0 or i >= L for i in drop):
            raise LayerpruneError(f"block indices {drop} out of range: the model has blocks 0..{L - 1}")
        if len(drop) >= L:
            raise LayerpruneError(f"cannot remove {len(drop)} of {L} blocks; keep at least one")
        if getattr(self.config, "scale_attn_by_inverse_layer_idx", False):
            raise LayerpruneError(
                "this GPT-2 scales attention by 1/layer_idx, which removing blocks would change; "
                "depth pruning is not supported for it"
            )
        keep = [i for i in range(L) if i not in set(drop)]
        if self.offload is not None:  # the blocks left read their weights from their old places
            self.offload.remove(drop)
        blocks = self.blocks
        new_blocks = nn.ModuleList([blocks[i] for i in keep])
        for j, block in enumerate(new_blocks):
            for module in block.modules():
                if hasattr(module, "layer_idx"):
                    module.layer_idx = j
        set_module(self.model, self.spec.blocks, new_blocks)
        for key, value in list(vars(self.config).items()):
            if key.startswith("_") or key in _NOT_PER_LAYER:
                continue
            if isinstance(value, (list, tuple)) and len(value) == L:
                setattr(self.config, key, type(value)(value[i] for i in keep))
        self.config.num_hidden_layers = len(keep)
