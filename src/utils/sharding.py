"""Sharding helpers: the FSDP wrap policy for the model families we support, and parameter counts that
survive sharding."""

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


def count_params(model) -> int:
    """Parameters of ``model`` at full size, however they are held: a DeepSpeed ZeRO-3 partition reports its
    full size in ``ds_numel`` (its ``numel()`` is 0), a meta tensor (deferred initialisation) has its shape.
    Count before FSDP flattens or shards the model: ``DistillationModule.configure_model`` does."""
    return sum(getattr(p, "ds_numel", None) or p.numel() for p in model.parameters())
