"""How the module runs across processes: the Lightning strategies it trains under, and the step's metrics taken
over every data-parallel rank."""

from __future__ import annotations

import torch

from src.modules.method.losses import data_parallel_ranks


def check_strategy(strategy, grad_clip: float | None = None) -> None:
    """Refuses the strategies this module cannot train or evaluate under. ``src/train.py`` and ``src/eval.py``
    call it as soon as the Trainer exists (before any model, stage or dataset is built), ``configure_model`` again.

    - FSDP1 (``FSDPStrategy``): Lightning runs ``training_step`` inside the root FSDP module's forward, and the
      manual optimisation here calls backward there, which FSDP's hooks reject ("Expects BACKWARD_PRE or
      BACKWARD_POST state but got HandleTrainingState.FORWARD", seen on an H100; Lightning-AI/pytorch-lightning
      #19626 and #19685). ``trainer=fsdp2`` shards with FSDP2 instead.
    - DeepSpeed ZeRO-3: ``transformers`` initialises weights that Lightning's ``zero.Init`` has already
      partitioned (an IndexError while loading, seen on an H100), and the chunked head reads ``lm_head.weight``
      outside the head's forward, where ZeRO-3 keeps it empty.
    - A bare ``ModelParallelStrategy``: it leaves all parallelism to the module's ``configure_model``, which shards
      only under ``FSDP2Strategy`` (``trainer=fsdp2``: every rank data-parallel and the sharding plan).
    - DeepSpeed clipping at another norm than ``grad_clip``: manual optimisation leaves the clip to DeepSpeed's
      ``gradient_clipping``, which Lightning sets to 0 (none) for a strategy given by name (``deepspeed_stage_2``).
    DDP, DeepSpeed ZeRO-2 and FSDP2 (``src/modules/sharding.py``) train."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    from src.modules.sharding import FSDP2Strategy

    name = type(strategy).__name__
    use = "use trainer=fsdp2 (FSDP2: weights, gradients and optimiser states sharded), or trainer=ddp"
    if isinstance(strategy, FSDPStrategy):
        raise ValueError(f"trainer.strategy: {name} (FSDP1) is not supported: Lightning runs training_step inside "
                         "the root FSDP module's forward, where this module's manual optimisation cannot call "
                         f"backward (Lightning-AI/pytorch-lightning#19626); {use}")
    if isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3:
        raise ValueError(f"trainer.strategy: {name} with zero_optimization.stage=3 is not supported: ZeRO-3 "
                         f"partitions the weights that the model loading and the chunked head read whole; {use}")
    if isinstance(strategy, ModelParallelStrategy) and not isinstance(strategy, FSDP2Strategy):
        raise ValueError(f"trainer.strategy: {name} is not supported as such: this module shards in configure_model "
                         "only under src.modules.sharding.FSDP2Strategy (every rank data-parallel, the sharding "
                         "plan); use trainer=fsdp2")
    if isinstance(strategy, DeepSpeedStrategy) and grad_clip is not None:
        clip = float((strategy.config or {}).get("gradient_clipping") or 0.0)
        if clip != float(grad_clip or 0.0):
            raise ValueError(f"module.grad_clip is {grad_clip}, but DeepSpeed clips at {clip} "
                             "(trainer.strategy.config.gradient_clipping; Lightning sets 0 for a strategy given by "
                             "name): set them alike, as configs/trainer/deepspeed_zero2.yaml does")


def check_sharding(strategy, objective, rollout, micro_batch_tokens: int | None = None) -> None:
    """What a strategy asks of the objective and the rollout backend (classes or instances); ``src/train.py`` calls
    it before any model loads, ``configure_model`` again.

    - Under FSDP2 both must read the models only through their module calls (``shardable``).
    - Under DeepSpeed, micro-batches (``objective.micro_batch_tokens``) are refused: its engine treats every
      backward as the end of an accumulation window unless its own ``gradient_accumulation_steps`` says otherwise,
      and this module's several backward calls a step were never checked against it."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from src.modules.sharding import FSDP2Strategy

    if isinstance(strategy, DeepSpeedStrategy) and micro_batch_tokens:
        raise ValueError("objective.micro_batch_tokens is not supported under DeepSpeed (trainer.strategy: "
                         f"{type(strategy).__name__}); use trainer=fsdp2 or trainer=ddp, or set it to null")
    if not isinstance(strategy, FSDP2Strategy):
        return
    name = lambda c: c.__name__ if isinstance(c, type) else type(c).__name__
    if not objective.shardable:
        raise ValueError(f"trainer=fsdp2: {name(objective)} reads the models' hidden states and heads outside a "
                         "module's forward, where FSDP2 keeps them sharded; use trainer=ddp")
    if not rollout.shardable:
        raise ValueError(f"trainer=fsdp2: {name(rollout)} reads the student's whole weights, which FSDP2 keeps "
                         "sharded; use rollout=hf (or rollout=tools) under trainer=fsdp2")


def over_ranks(logs: dict, summed: tuple[str, ...] = ()) -> dict:
    """The step's metrics over every data-parallel rank (one all-reduce): the mean over the ranks, or the sum for
    the keys in ``summed`` (counts and rates). The loss each rank holds is its share of the batch's loss
    (``src.modules.method.losses._per_rank``), so the mean is the batch's loss. Per-rank means (entropy, rewards) and
    quantiles become means of the ranks' values: exact for means where the ranks hold as many tokens, close
    otherwise. One process: ``logs`` unchanged."""
    ranks = data_parallel_ranks()
    if ranks == 1 or not logs:
        return logs
    keys = list(logs)
    device = next((v.device for v in logs.values() if isinstance(v, torch.Tensor)), None)
    values = torch.stack([torch.as_tensor(logs[k], dtype=torch.float32, device=device).detach().reshape(())
                          for k in keys])
    if device is None and torch.distributed.get_backend() == "nccl":
        values = values.cuda()
    torch.distributed.all_reduce(values)
    values = values.cpu()
    return {k: values[i] / (1 if k in summed else ranks) for i, k in enumerate(keys)}
