"""The CPU wing (``accel=cpu``): Qwen2 / Llama scoring and decoding through fused layers with hand-written
backwards, for small models on the CPU, where per-op overhead dominates. Each piece computes the model's own forward
(to float rounding) and steps aside, to the Hugging Face forward, wherever it does not apply.

- ``FusedBackbone`` (``module.backbone``): the scoring ``Backbone`` (``backbone.py``).
- ``FusedDecoder`` (``rollout.decoder``): the decode loop's ``Decoder`` factory (``decode_step.py``).
"""

from src.accel.cpu.backbone import FusedBackbone, FusedScorer
from src.accel.cpu.decode_step import FusedDecoder, FusedDecodeStep, fusable

__all__ = ["FusedBackbone", "FusedDecodeStep", "FusedDecoder", "FusedScorer", "fusable"]
