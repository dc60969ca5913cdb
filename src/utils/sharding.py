"""Sharding policies for FSDP: wrap each decoder layer of the model families we support."""

from __future__ import annotations

import importlib

_LAYERS = {
    "transformers.models.qwen2.modeling_qwen2": "Qwen2DecoderLayer",
    "transformers.models.qwen3.modeling_qwen3": "Qwen3DecoderLayer",
    "transformers.models.llama.modeling_llama": "LlamaDecoderLayer",
    "transformers.models.qwen2_vl.modeling_qwen2_vl": "Qwen2VLDecoderLayer",
    "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl": "Qwen2_5_VLDecoderLayer",
}


def decoder_layer_classes() -> set[type]:
    """The decoder-layer classes importable in this ``transformers`` (FSDP's ``auto_wrap_policy``)."""
    out = set()
    for mod, name in _LAYERS.items():
        try:
            out.add(getattr(importlib.import_module(mod), name))
        except (ImportError, AttributeError):
            continue
    return out
