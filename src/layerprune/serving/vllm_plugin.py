"""layerprune's vLLM plugin: vLLM loads our DeciLM / nemotron-nas exports with no remote code.

`pip install layerprune[vllm]` (or layerprune beside vLLM) declares the entry point
`vllm.general_plugins: layerprune = layerprune.serving.vllm_plugin:register`; vLLM calls `register()`
in every process it starts, before reading a model's config. It puts our `NemotronNasConfig` in
vLLM's config registry (`vllm.transformers_utils.config._CONFIG_REGISTRY`, the table vLLM consults
before asking transformers, which has no nemotron-nas class) and registers it with transformers'
AutoConfig, so that `vllm serve DIR` and `vllm.LLM(DIR)` read config.json into it; vLLM's own
`DeciLMForCausalLM` then builds the model. Standard exports (depth, uniform width) need no plugin.

Importing this module imports nothing but the standard library: vLLM imports every installed
plugin, and layerprune's pipeline (torch, models) has no business there.
"""

from __future__ import annotations

from .nemotron_nas import MODEL_TYPE


def register() -> None:
    """Called by vLLM (possibly more than once per process): registering again is harmless."""
    from transformers import AutoConfig
    from vllm.transformers_utils.config import _CONFIG_REGISTRY

    from .nemotron_nas_config import NemotronNasConfig

    existing = dict.get(_CONFIG_REGISTRY, MODEL_TYPE)  # raw: vLLM's own entries are lazy class names
    if existing is not None and existing is not NemotronNasConfig:
        return  # a class vLLM itself (a later release) or the user registered wins over ours
    _CONFIG_REGISTRY[MODEL_TYPE] = NemotronNasConfig
    AutoConfig.register(MODEL_TYPE, NemotronNasConfig, exist_ok=True)
