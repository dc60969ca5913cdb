"""Whether a run fits its GPUs, before any model loads: per-GPU peak memory by phase, from the models' shapes.

``plan(cfg)`` reads the composed config (models, batch, token budgets, strategy and sharding plan, micro-batch
and KV-cache budgets) and estimates each phase's peak on one GPU:

- **static**: what lives through the whole step. Student: master weights, gradients and AdamW's two moments
  (``4 x`` the master bytes a parameter; trainable parameters only for the last three); teacher: weights. Under
  ``trainer=fsdp2`` each is divided by the GPUs (the teacher only if ``sharded``); under DeepSpeed ZeRO-2 the
  gradients and moments are, the weights are whole; under DDP nothing is.
- **rollout** (by the student; by the teacher for ``algorithm=sft``; none for the SFT stages): static + the
  policy's weights gathered in its compute dtype for the whole rollout (FSDP2; whole anyway otherwise) + the KV
  cache of the rows decoded at once (``rollout.kv_cache_gb`` caps it: rows in chunks) + the prompt's prefill (one
  layer's activations at a time) + one step's ``[rows, V]`` fp32 logits (x3: logits, log-softmax, the sampling
  copy).
- **teacher scoring**: static + the teacher's gathered units (two blocks in flight and the root) + one
  micro-batch's activations under ``no_grad`` (one layer's at a time) + the chunked head's ``[chunk, V]`` buffers.
- **update**: static + the student's gathered units and their unsharded gradients (compute dtype, and the fp32
  copy reduced) + one micro-batch's activations kept for the backward: with activation checkpointing every layer's
  input and one layer's full set recomputed; without, every layer's full set + the head's buffers.
A hybrid plan (HSDP, ``hybrid`` on several nodes) shards over the GPUs of one node only.

A layer's full set of activations, per token, in bytes, at compute dtype ``c`` (Qwen2/Llama-style, SDPA or flash
attention, so no ``T x T`` matrix is kept): ``c * (6 H + 2 kv d + 4 I) + 8 H`` (norm inputs upcast to fp32), with
``H`` hidden, ``I`` the MLP width, ``kv d`` the key/value width. A fixed ``RESERVE_GB`` covers the CUDA context,
NCCL buffers and allocator fragmentation. Vision encoders count in weights and gathered units, not in
activations (an image's patches are few against a 2k-token response).

An estimate, not a measurement: the tests check it on known shapes; how close it comes to a GPU's peak is for the
GPU check of the README to say.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from pathlib import Path

import torch

from src.modules.models.specs import trainer_compute_dtype

GB = 1e9
RESERVE_GB = 3.0
SHAPES = Path(__file__).resolve().parents[2] / "configs" / "model" / "shapes"
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclasses.dataclass
class Shape:
    """What the plan needs of a model's architecture (parameter counts from the model built on the meta device)."""

    params: int
    largest_block: int  # parameters of the largest transformer block (an FSDP unit)
    root: int  # parameters outside every block (embeddings, final norm, head, vision merger)
    layers: int
    hidden: int
    intermediate: int
    kv_width: int  # key/value heads x head dim
    vocab: int

    def layer_bytes_per_token(self, compute_bytes: int) -> float:
        """One decoder layer's activations kept for its backward, a token (see the module docstring)."""
        return compute_bytes * (6 * self.hidden + 2 * self.kv_width + 4 * self.intermediate) + 8 * self.hidden

    def kv_bytes_per_token(self, compute_bytes: int) -> int:
        return self.layers * 2 * self.kv_width * compute_bytes


def config_of(path: str) -> dict:
    """A model's ``config.json`` fields: from a local directory, the Hugging Face cache, or ``configs/model/shapes``."""
    local = Path(path).expanduser()
    if (local / "config.json").exists():
        return json.loads((local / "config.json").read_text())
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(path, local_files_only=True).to_dict()
    except (OSError, ValueError):
        pass
    shipped = SHAPES / f"{path.replace('/', '--')}.json"
    if shipped.exists():
        return json.loads(shipped.read_text())
    raise FileNotFoundError(f"no config.json for {path!r}: not a local directory, not in the Hugging Face cache, and "
                            f"not in {SHAPES} (add its published config.json fields there as "
                            f"{path.replace('/', '--')}.json)")


def shape_of(config: dict) -> Shape:
    """The ``Shape`` of a model from its config fields, counting parameters on the meta device (nothing allocated)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    from src.modules.sharding import blocks

    fields = dict(config)
    cfg = AutoConfig.for_model(fields.pop("model_type"), **fields)
    auto = AutoModelForImageTextToText if getattr(cfg, "vision_config", None) else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(cfg)
    params = sum(p.numel() for p in model.parameters())
    block_params = [sum(p.numel() for p in b.parameters()) for b in blocks(model)]
    text = cfg.get_text_config()
    return Shape(params=params, largest_block=max(block_params), root=params - sum(block_params),
                 layers=text.num_hidden_layers, hidden=text.hidden_size, intermediate=text.intermediate_size,
                 kv_width=kv_width(text), vocab=text.vocab_size)


def kv_width(text_config) -> int:
    """Key/value heads x head dim of a (text) model config."""
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    return text_config.num_key_value_heads * head_dim


def rows_in_budget(budget_gb: float, bytes_a_row: float) -> int:
    """How many rows of ``bytes_a_row`` fit in ``budget_gb`` (at least one)."""
    return max(1, math.floor(budget_gb * GB / bytes_a_row))


@dataclasses.dataclass
class Plan:
    """Per-GPU peaks (GB) by phase, and what they were computed from."""

    phases: dict[str, dict[str, float]]  # phase -> component -> GB
    gpu_gb: float
    settings: dict[str, object]

    def peak(self, phase: str) -> float:
        return sum(self.phases[phase].values())

    @property
    def fits(self) -> bool:
        return all(self.peak(p) <= self.gpu_gb for p in self.phases)

    def table(self) -> str:
        components = list(dict.fromkeys(c for parts in self.phases.values() for c in parts))
        lines = ["| GB per GPU | " + " | ".join(self.phases) + " |", "|---|" + "---|" * len(self.phases)]
        for c in components:
            lines.append(f"| {c} | " + " | ".join(f"{parts[c]:.1f}" if c in parts else "" for parts in
                                                   self.phases.values()) + " |")
        lines.append("| **peak** | " + " | ".join(f"**{self.peak(p):.1f}**" for p in self.phases) + " |")
        verdict = "fits" if self.fits else "DOES NOT FIT"
        lines.append(f"\n{verdict} in {self.gpu_gb:g} GB a GPU; " + ", ".join(f"{k}={v}" for k, v in
                                                                           self.settings.items()))
        return "\n".join(lines)


def _strategy(cfg) -> tuple[str, dict]:
    target = str((cfg.trainer.get("strategy") or {}).get("_target_", ""))
    if target.endswith("FSDP2Strategy"):
        plan = dict(cfg.trainer.strategy.get("plan") or {})
        return "fsdp2", plan
    if target.endswith("DeepSpeedStrategy"):
        return "zero2", {}
    return "ddp", {}


def _devices(cfg) -> int:
    devices = cfg.trainer.get("devices", 1)
    if devices in (-1, "auto", None):
        return torch.cuda.device_count() or 8
    return int(devices) if not isinstance(devices, (list, tuple)) else len(devices)


def _roles(cfg) -> tuple[str | None, bool]:
    """Who rolls out (``student``, ``teacher`` or None: the data's solutions) and whether a teacher is loaded, from
    the objective's (and reward's) classes, without building them."""
    from hydra.utils import get_class

    objective = get_class(cfg.objective._target_)
    rollout = {"SupervisedDistillation": "teacher", "ReferenceSFT": None}.get(objective.__name__, "student")
    needs = objective.needs_teacher
    if isinstance(needs, property):  # PolicyGradient: its reward decides
        needs = get_class(cfg.objective.reward._target_).needs_teacher
    return rollout, bool(needs) and cfg.model.get("teacher") is not None


def plan(cfg, gpu_gb: float = 80.0, gpus: int | None = None, prompt_tokens: int = 1024) -> Plan:
    """The per-GPU plan of a composed training config (see the module docstring). ``gpus``: the GPUs of the run
    (default: ``trainer.devices`` x ``trainer.num_nodes``, -1 counted as 8; a hybrid plan shards within a node
    only); ``prompt_tokens``: the longest prompt a row holds (images' tokens included)."""
    nodes = int(cfg.trainer.get("num_nodes", 1) or 1)
    gpus = gpus or _devices(cfg) * nodes
    strategy, sharding = _strategy(cfg)
    shards = gpus // nodes if strategy == "fsdp2" and sharding.get("hybrid") and nodes > 1 else gpus
    policy, with_teacher = _roles(cfg)
    student_cfg, teacher_cfg = cfg.model.student, cfg.model.get("teacher")
    s = shape_of(config_of(student_cfg.path))
    self_teacher = with_teacher and teacher_cfg == "self"  # self-distillation: the student's shape, maybe a copy
    t = (s if self_teacher else shape_of(config_of(teacher_cfg.path))) if with_teacher else None
    master = DTYPE_BYTES[str(student_cfg.get("dtype", "float32"))]
    param_dtype = sharding.get("param_dtype", "bfloat16") if strategy == "fsdp2" else None
    precision = str(cfg.trainer.get("precision", "32-true"))
    compute = DTYPE_BYTES[param_dtype] if param_dtype else (2 if "16" in precision else master)
    teacher_bytes = 0 if t is None else master if self_teacher else \
        DTYPE_BYTES[str(teacher_cfg.get("dtype") or trainer_compute_dtype(cfg.trainer))]
    teacher_sharded = strategy == "fsdp2" and sharding.get("teacher_placement", "sharded") == "sharded"
    checkpointing = strategy == "fsdp2" and bool(sharding.get("activation_checkpointing", True))

    rows = int(cfg.data.batch_size) * int(cfg.rollout.get("num_samples", 1))
    turns = int(cfg.rollout.get("max_turns", 1) or 1)
    new_tokens = int(cfg.rollout.max_new_tokens) * turns
    seq = prompt_tokens + new_tokens
    micro = cfg.objective.get("micro_batch_tokens") or rows * seq
    micro_tokens = min(int(micro), rows * seq)
    micro_tokens = max(micro_tokens, seq)  # a row is never split
    chunk = int(cfg.module.get("chunk_size", 1024))

    weights = s.params * master
    states = 3 * s.params * master  # gradients and AdamW's two moments (the frozen few counted too: an upper bound)
    static = {"student weights": weights / (shards if strategy == "fsdp2" else 1) / GB,
              "student grads + AdamW": states / (shards if strategy in ("fsdp2", "zero2") else 1) / GB}
    if self_teacher:  # the current weights are the student's own; a frozen or EMA copy is one more
        if cfg.module.get("self_teacher", {}).get("weights", "current") != "current":
            static["teacher copy of the student"] = t.params * master / GB
    elif t is not None:
        static["teacher weights"] = t.params * teacher_bytes / (shards if teacher_sharded else 1) / GB
    static["CUDA context, NCCL, fragmentation"] = RESERVE_GB

    phases = {}
    decode_rows = 0
    if policy is not None:  # the rollout: the policy's weights gathered, its KV cache, prefill and logits
        p, p_bytes = (s, compute) if policy == "student" else (t, teacher_bytes)
        kv_per_row = p.kv_bytes_per_token(p_bytes) * seq
        kv_cap = cfg.rollout.get("kv_cache_gb")
        decode_rows = rows if not kv_cap else min(rows, rows_in_budget(float(kv_cap), kv_per_row))
        rollout = dict(static)
        if strategy == "fsdp2" and (policy == "student" or teacher_sharded):
            rollout[f"{policy} gathered for the rollout"] = p.params * p_bytes / GB
        rollout["KV cache"] = decode_rows * kv_per_row / GB
        rollout["prefill (no grad, a layer)"] = 2 * decode_rows * prompt_tokens * p.layer_bytes_per_token(p_bytes) / GB
        rollout["decode logits"] = 3 * decode_rows * p.vocab * 4 / GB
        phases["rollout"] = rollout
    if t is not None and policy == "student":
        scoring = dict(static)
        if teacher_sharded:
            scoring["teacher units gathered"] = (2 * t.largest_block + t.root) * teacher_bytes / GB
        scoring["activations (no grad, a layer)"] = 2 * micro_tokens * t.layer_bytes_per_token(teacher_bytes) / GB
        scoring["head chunks"] = 2 * chunk * t.vocab * 4 / GB
        phases["teacher scoring"] = scoring

    update = dict(static)
    if strategy == "fsdp2":
        in_flight = 2 * s.largest_block + s.root
        update["student units gathered"] = in_flight * compute / GB
        # each unit's unsharded gradient in the compute dtype, and its fp32 copy for the reduce-scatter
        update["unsharded gradients in flight"] = in_flight * (compute + 4) / GB
    if checkpointing:
        kept = micro_tokens * (s.layers * s.hidden * compute + 2 * s.layer_bytes_per_token(compute))
    else:
        kept = micro_tokens * s.layers * s.layer_bytes_per_token(compute)
    update["activations for the backward"] = kept / GB
    update["head chunks"] = 2 * chunk * s.vocab * 4 / GB
    phases["update"] = update

    settings = {"trainer": strategy + (" (hybrid)" if shards != gpus else ""), "GPUs": gpus, "rows a GPU": rows,
                "tokens a row": seq, "micro_batch_tokens": cfg.objective.get("micro_batch_tokens"),
                "rollout by": policy or "none (the data's solutions)", "rows decoded at once": decode_rows,
                "student": f"{s.params / 1e9:.1f}B", "teacher": f"{t.params / 1e9:.1f}B" if t else None,
                "activation checkpointing": checkpointing}
    return Plan(phases, gpu_gb, settings)


def rows_for_kv_budget(model_config, budget_gb: float, tokens_a_row: int, compute_bytes: int) -> int:
    """How many rows' KV cache of ``tokens_a_row`` tokens fit in ``budget_gb`` (at least one)."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    return rows_in_budget(budget_gb, text.num_hidden_layers * 2 * kv_width(text) * compute_bytes * tokens_a_row)


def check_hardware(cfg) -> None:
    """Before the Trainer or any model is built (``src/train.py``): a GPU run on a machine without CUDA stops with
    what the experiment needs, what this machine has and the command of its CPU miniature (``cpu_miniature``), not
    with Lightning's "No supported gpu backend found!"; a GPU run whose plan does not fit its GPUs stops with the
    plan's table. ``memory_check=false`` skips the plan (models whose shapes cannot be read offline skip it too)."""
    if str(cfg.trainer.get("accelerator", "cpu")) != "gpu":
        return
    import os

    gpu_plan = None
    try:
        gpu_plan = plan(cfg, gpu_gb=torch.cuda.get_device_properties(0).total_memory / GB
                        if torch.cuda.is_available() else 80.0)
    except (FileNotFoundError, KeyError, ValueError):
        pass
    if not torch.cuda.is_available():
        devices = cfg.trainer.get("devices")
        need = f"{'all the' if devices in (-1, 'auto') else devices} GPU(s) of a node (trainer.devices={devices})"
        if gpu_plan is not None:
            need += (f", {max(gpu_plan.peak(p) for p in gpu_plan.phases):.0f} GB a GPU by the memory plan at "
                     f"{gpu_plan.settings['GPUs']} GPUs")
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        mini = cfg.get("cpu_miniature")
        raise SystemExit(
            f"{cfg.get('task_name', 'this experiment')} trains on GPUs: it needs {need}. This machine has no CUDA "
            f"device ({os.cpu_count()} CPU cores, {ram:.0f} GiB of memory)."
            + (f" Its CPU miniature runs here: {mini}" if mini else " Set trainer=cpu to run on the CPU anyway."))
    if gpu_plan is not None and cfg.get("memory_check", True) and not gpu_plan.fits:
        raise SystemExit("the memory plan does not fit these GPUs (python benchmarks/memory_plan.py with the same "
                         "overrides prints it; memory_check=false skips the check):\n\n" + gpu_plan.table())


class PhasePeaks:
    """Per-phase peak GPU memory of a training step (``train/peak_gb_<phase>``), to set against the plan's phases:
    ``with peaks("rollout"): ...``. On a CPU device it records nothing."""

    def __init__(self, device: torch.device):
        self.on_gpu = device.type == "cuda"
        self.logs: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        if self.on_gpu:
            torch.cuda.reset_peak_memory_stats()
        yield
        if self.on_gpu:
            self.logs[f"peak_gb_{phase}"] = torch.cuda.max_memory_allocated() / GB
