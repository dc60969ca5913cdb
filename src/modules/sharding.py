"""Sharded training with FSDP2 (``torch.distributed.fsdp.fully_shard``) through Lightning's ``ModelParallelStrategy``.

``trainer=fsdp2`` (GPUs, NCCL) and ``trainer=fsdp2_cpu`` (two CPU processes, gloo: the test suite's) use
``FSDP2Strategy``. Lightning calls ``training_step`` directly under it (no wrapping forward, unlike FSDP1), so the
module's manual optimisation runs as under DDP. The module applies the ``ShardingPlan`` in ``configure_model``:

- each transformer block (the model's ``_no_split_modules``: decoder layers, vision blocks) becomes one FSDP
  unit, after Hugging Face's activation checkpointing where the plan asks for it (student only: the teacher
  has no backward);
- the ``ScoredModel`` around the model (``src/modules/scoring.py``) is the root unit: embeddings, final norm and
  head (tied weights stay one parameter there). Scoring is that root's forward, so the head is gathered where
  the chunked head reads it; a rollout is a second forward method of it (``run``), with every block kept
  gathered for the whole rollout and freed after it (``gathered``), not gathered again for every token;
- the student computes in ``param_dtype`` (bf16 on GPUs) over fp32 master weights and reduces gradients in
  ``reduce_dtype`` (fp32); the teacher keeps its own dtype and is ``sharded`` like the student or
  ``replicated`` (whole on every rank: no gathers, more memory).

Micro-batches (``objective.micro_batch_tokens``) reduce-scatter the gradients after each backward, so they stay
sharded; skipping the sync until the last micro-batch would cut the traffic but hold every unit's unsharded
gradients (fp32: four bytes a parameter on every GPU), which is what sharding is for avoiding.

Every rank is a data-parallel rank (``data_parallel_size`` = world size, ``tensor_parallel_size`` = 1: Lightning's
default would put the devices on the tensor-parallel axis). On several nodes, ``hybrid: true`` shards within a
node and replicates across nodes (HSDP, a 2-D mesh ``replicate x shard``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import torch
from lightning.pytorch.strategies import ModelParallelStrategy

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, None: None}


@dataclasses.dataclass
class ShardingPlan:
    """How ``configure_model`` shards the models (see the module docstring).

    Args:
        param_dtype: the student's compute dtype (``bfloat16``; null: its weights' own).
        reduce_dtype: the dtype gradients are reduced in (``float32``).
        activation_checkpointing: recompute each student block's activations in the backward.
        teacher_placement: ``sharded`` or ``replicated``.
        reshard_after_forward: free each block's gathered weights after its forward (ZeRO-3 style); false keeps
            them to the backward (ZeRO-2 style: more memory, fewer gathers).
        hybrid: on several nodes, shard within a node and replicate across nodes.
        init_from_rank0: only global rank 0 reads a sharded model's checkpoint; the other ranks build it on the meta
            device and receive their shards from rank 0 (one host copy per node, not one per GPU).
    """

    param_dtype: str | None = "bfloat16"
    reduce_dtype: str | None = "float32"
    activation_checkpointing: bool = True
    teacher_placement: str = "sharded"
    reshard_after_forward: bool = True
    hybrid: bool = False
    init_from_rank0: bool = True

    def __post_init__(self):
        for key in ("param_dtype", "reduce_dtype"):
            if getattr(self, key) not in DTYPES:
                raise ValueError(f"trainer.strategy.plan.{key} must be one of {sorted(k for k in DTYPES if k)} or null, "
                                 f"got {getattr(self, key)!r}")
        if self.teacher_placement not in ("sharded", "replicated"):
            raise ValueError("trainer.strategy.plan.teacher_placement must be 'sharded' or 'replicated', "
                             f"got {self.teacher_placement!r}")

    def shard(self, scored, mesh, trainable: bool) -> None:
        """Shards ``scored`` (a ``ScoredModel``) in place: blocks, then the root. ``trainable``: the student
        (mixed precision, activation checkpointing); else the frozen teacher (its own dtype, no checkpointing)."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

        model = scored.model
        if trainable and self.activation_checkpointing:
            if not getattr(model, "supports_gradient_checkpointing", False):
                raise ValueError(f"trainer.strategy.plan.activation_checkpointing: {type(model).__name__} does not "
                                 "support it; set it to false")
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        policy = MixedPrecisionPolicy(param_dtype=DTYPES[self.param_dtype], reduce_dtype=DTYPES[self.reduce_dtype]) \
            if trainable else MixedPrecisionPolicy()
        for block in blocks(model):
            fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=self.reshard_after_forward)
        fully_shard(scored, mesh=mesh, mp_policy=policy, reshard_after_forward=self.reshard_after_forward)
        register_fsdp_forward_method(scored, "run")
        scored.around_run = lambda: gathered(scored, self.reshard_after_forward)


def fill_from_rank0(model: torch.nn.Module, full_state: dict | None, device: torch.device) -> None:
    """After ``fully_shard``: every rank's shards and buffers from global rank 0's full state dict (``full_state``
    there, None elsewhere). A rank that built the model on the meta device allocates its shards first; buffers
    that are not in a state dict (rotary frequencies) are broadcast as they are."""
    import itertools

    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers())):
        model.to_empty(device=device)
    set_model_state_dict(model, full_state or {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's transformer blocks: the modules whose class Hugging Face never splits across devices
    (``_no_split_modules``: decoder layers and vision blocks), outermost first."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    found = [m for m in model.modules() if type(m).__name__ in names]
    if not found:
        raise ValueError(f"{type(model).__name__} declares no transformer blocks (_no_split_modules), so FSDP2 "
                         "would gather the whole model at once; use trainer=ddp")
    return found


@contextlib.contextmanager
def gathered(scored, reshard_after_forward: bool = True):
    """Every FSDP unit of ``scored`` keeps its gathered weights from its first forward to the end of the block (a
    rollout calls each layer once per token), then all are freed and resharding goes back to the plan's
    ``reshard_after_forward``."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in scored.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(reshard_after_forward, recurse=False)


def full(t):
    """A DTensor's full value (a norm taken over sharded gradients), anything else unchanged."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` with every rank on the data-parallel axis, and the module's ``ShardingPlan``.

    Args:
        plan: keyword arguments of ``ShardingPlan`` (``param_dtype``, ``reduce_dtype``, ``activation_checkpointing``,
            ``teacher_placement``, ``reshard_after_forward``, ``hybrid``).
        save_distributed_checkpoint, process_group_backend, timeout: as ``ModelParallelStrategy``'s.
    """

    def __init__(self, plan: dict | None = None, save_distributed_checkpoint: bool = True,
                 process_group_backend: str | None = None, **kwargs):
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, **kwargs)
        self.plan = ShardingPlan(**(plan or {}))

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def shard_mesh(self):
        """The mesh ``fully_shard`` uses: the data-parallel axis, or ``replicate x shard`` (nodes x GPUs a node)
        where the plan is hybrid and there are several nodes."""
        if self.plan.hybrid and self.num_nodes > 1:
            from torch.distributed.device_mesh import init_device_mesh

            return init_device_mesh(self.root_device.type, (self.num_nodes, self.num_processes),
                                    mesh_dim_names=("replicate", "shard"))
        return self.device_mesh["data_parallel"]

    def loads_empty(self, sharded: bool) -> bool:
        """Whether this rank builds a model on the meta device and receives its weights from rank 0 (``sharded``:
        the model will be sharded; a replicated one is read by every rank)."""
        return sharded and self.plan.init_from_rank0 and self.global_rank != 0

    def shard(self, scored, trainable: bool) -> None:
        """Shards ``scored`` by the plan; with ``init_from_rank0``, fills it from rank 0's weights after."""
        model = scored.model
        full_state = model.state_dict() if self.plan.init_from_rank0 and self.global_rank == 0 else None
        self.plan.shard(scored, self.shard_mesh(), trainable)
        if self.plan.init_from_rank0:
            fill_from_rank0(model, full_state, self.root_device)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict:
        """A distributed checkpoint loaded into the shards, less the keys the module leaves out of its checkpoints
        (``not_checkpointed``: the frozen teacher, reloaded from its spec). Lightning's own loader asks for every
        key of the module and stops at the first one missing."""
        import torch.distributed.checkpoint as dcp
        from lightning.fabric.strategies.model_parallel import _METADATA_FILENAME, _is_sharded_checkpoint
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        path = Path(self.broadcast(checkpoint_path))
        if not _is_sharded_checkpoint(path):
            return super().load_checkpoint(path, weights_only)
        skip = tuple(getattr(self.lightning_module, "not_checkpointed", ()))
        state = {"state_dict": {k: v for k, v in get_model_state_dict(self.model).items() if not k.startswith(skip)}}
        dcp.load(state, checkpoint_id=path)  # in place, into the shards
        self.model.load_state_dict(state["state_dict"], strict=False)
        for i, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{i}"
            optim_state = {key: get_optimizer_state_dict(self.model, optimizer)}
            dcp.load(optim_state, checkpoint_id=path)
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=optim_state[key],
                                     options=StateDictOptions(cpu_offload=True))
        return torch.load(path / _METADATA_FILENAME, weights_only=bool(weights_only))
