"""Parameter counts that survive sharding."""

from __future__ import annotations


def count_params(model) -> int:
    """Parameters of ``model`` at full size, however they are held: a DeepSpeed ZeRO-3 partition reports its
    full size in ``ds_numel`` (its ``numel()`` is 0), a meta tensor (deferred initialisation) has its shape.
    Count before a strategy shards the model: ``DistillationModule.configure_model`` does."""
    return sum(getattr(p, "ds_numel", None) or p.numel() for p in model.parameters())
