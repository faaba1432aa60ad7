"""What serving engines need from layerprune, importable without torch.

`nemotron_nas` holds the DeciLM / Nemotron-NAS key set and arithmetic (pure Python);
`nemotron_nas_config` our transformers config class for `"model_type": "nemotron-nas"` (imports
transformers); `vllm_plugin` the function vLLM's `vllm.general_plugins` entry point calls, which
registers that class so that vLLM loads our DeciLM exports without remote code.
"""
