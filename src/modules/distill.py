"""The LightningModule: a trainable student, a frozen teacher, and injected components.

One training step (paper Sec. 5), top to bottom:
    1. rollout  - ``objective.rollout``: the sampler runs the rollout backend for a policy (the student; the
                  teacher for off-policy SFT; the data's solutions for the SFT stages), G responses per prompt,
                  with the rollout-time log-probs and entropies of the sampled tokens (``pi_old``);
    2. prepare  - ``objective.prepare``, no gradient: the teacher's scores of the sampled tokens (the scorer), then
                  reward, clip and token selection, and the batch metrics;
    3. update   - ``epochs * minibatches`` optimiser steps on ``objective.loss`` (manual optimisation, so several
                  steps can follow one rollout), each clipped to ``grad_clip``; each minibatch's gradient accumulated
                  over micro-batches of at most ``objective.micro_batch_tokens`` tokens (``accumulate``).
The token selection in force is ``self.selection``; the phase callback swaps it (exploration -> refinement).
Nothing in the step branches on a mode string: every choice is a component, and how the backbone and the decode
loop compute is behind their seams (``module.backbone``, ``rollout.decoder``).

The teacher runs under ``torch.no_grad`` in eval mode with ``requires_grad=False``, in its own dtype,
and is left out of checkpoints (it is reloaded from its spec; a self-distillation EMA copy is kept in them). It may read another prompt than the student's and
another tokenisation of the response: a cross-vocabulary teacher (``model.teacher.cross_vocab``,
``src/modules/cross_vocab.py``) or the student itself with privileged context (``model.teacher=self``,
``src/modules/self_distillation.py``); both are the scorer's business, and the step reads the same.
"""

from __future__ import annotations

import time
import warnings

import torch
from lightning import LightningModule

from src.modules.cross_vocab import CrossVocabTeacher
from src.modules.diagnostics import exact_reverse_kl_cosine
from src.modules.distributed import check_sharding, check_strategy, over_ranks
from src.modules.evaluation.evaluator import Evaluator
from src.modules.guards import NonFiniteError, NonFiniteGuard, nonfinite_parameters, nonfinite_tensors
from src.modules.memory_plan import PhasePeaks
from src.modules.method.objectives import accumulate
from src.modules.method.selection import AllTokens
from src.modules.models.multimodal import preflight_processors, vision_token_ids
from src.modules.models.preflight import preflight, preflight_cross_vocab, preflight_dtypes
from src.modules.rollout.sampler import Sampler
from src.modules.scoring import Scorer, hf_backbone
from src.modules.self_distillation import SelfTeacher
from src.modules.sharding import DTYPES, FSDP2Strategy, full
from src.utils.sharding import count_params


class DistillationModule(LightningModule):
    """
    Args:
        student: spec with ``load_model()`` / ``load_tokenizer()`` (``PretrainedLM``, ``TinyQwen2``).
        teacher: spec of the frozen teacher, or None when the objective needs none (GRPO), or ``"self"``: the
            student's own weights (``self_teacher``), reading privileged context (``data.teacher_context``).
        rollout: a ``RolloutBackend`` (``HFGenerateRollout``, ``ToolRollout``, ``VLLMRollout``).
        objective: an ``Objective`` (``PolicyGradient``, ``GeneralizedJSD``, ``SupervisedDistillation``, ...).
        optimizer: partial ``torch.optim`` constructor taking the parameters.
        scheduler: optional partial LR scheduler constructor taking the optimizer (stepped per update).
        selection: token selection in force at the start (the phase callback may replace it).
        grader: ``(response, reference) -> bool`` for validation accuracy.
        answer_fn: ``response -> str | None``, the final answer a majority vote counts.
        task: name used in validation metric keys (``val/<task>/acc``).
        eval_samples: k responses sampled per prompt (at the rollout temperature and the validation token
            budget) besides the greedy one, for ``avg@k``, ``pass@k`` and ``maj@k``; 0 evaluates greedy only.
        record_samples: keep every evaluated response's result (``src/eval.py`` writes them out).
        chunk_size: tokens per head application in the scorer.
        backbone: the scorer's ``Backbone`` (default: the Hugging Face forward; the ``accel`` group sets another).
        grad_clip: max gradient norm (None disables).
        nonfinite: the non-finite guard's settings (``policy``, ``max_skips``, ``warn_empty_steps``:
            ``src/modules/guards.py``); None: stop at the first NaN or inf.
        grad_cosine_every: every this many steps (0: never), log ``train/grad_cos_exact_rkl``: the cosine between
            the method's gradient and the exact full-vocabulary reverse-KL gradient on the same batch (an extra
            forward and backward; ``src/callbacks/diagnostics.py``). Unsharded strategies, with a teacher.
        self_teacher: with ``teacher="self"``: ``{weights: current | frozen | ema, ema_decay}``
            (``src/modules/self_distillation.py``).
    """

    not_checkpointed = ("teacher.",)  # reloaded from its spec

    def __init__(self, student, teacher, rollout, objective, optimizer, scheduler=None, selection=None,
                 grader=None, answer_fn=None, task: str = "math", chunk_size: int = 1024,
                 grad_clip: float | None = 1.0, seed: int = 0, eval_samples: int = 0, record_samples: bool = False,
                 backbone=None, nonfinite: dict | None = None, grad_cosine_every: int = 0,
                 self_teacher: dict | None = None):
        super().__init__()
        self.automatic_optimization = False
        self.strict_loading = False  # the teacher is not in checkpoints
        if teacher == "self":
            teacher = SelfTeacher(**dict(self_teacher or {}))
        elif isinstance(teacher, str):
            raise ValueError(f"model.teacher must be a model spec, null or 'self', got {teacher!r}")
        self.student_spec, self.teacher_spec = student, teacher
        if objective.needs_teacher and teacher is None:
            raise ValueError(f"{type(objective).__name__} needs a teacher but model.teacher is null")
        self.objective, self.grad_cosine_every = objective, grad_cosine_every
        self.teacher_context = False  # set by use_teacher_prompts: the data gives the teacher a prompt of its own
        self._check_teacher_input()
        self.rollout = rollout
        self.optimizer_fn, self.scheduler_fn = optimizer, scheduler
        self.selection = selection or AllTokens()
        if grader is None:
            from src.modules.evaluation.grading import is_correct as grader
        if answer_fn is None:
            from src.modules.evaluation.grading import final_answer as answer_fn
        self.task = task
        self.evaluator = Evaluator(grader, answer_fn, eval_samples, record_samples)
        self.chunk_size, self.grad_clip, self.seed = chunk_size, grad_clip, seed
        self.guard = NonFiniteGuard(**dict(nonfinite or {}))
        if grad_cosine_every < 0 or (grad_cosine_every and teacher is None):
            raise ValueError("module.grad_cosine_every compares with the exact reverse KL to the teacher: it needs "
                             f"a teacher and a value >= 0 (0: off), got {grad_cosine_every}"
                             + (" without a teacher" if teacher is None else ""))
        self.backbone = backbone or hf_backbone
        self.student = self.teacher = self.tokenizer = self.processor = None
        self.scorer: Scorer | None = None  # set by configure_model
        self.sampler: Sampler | None = None
        self.student_n_params = None
        self._eval_seconds_per_prompt: dict[str, float] = {}  # per split, from its latest evaluation (estimates)
        self._eval_started: tuple[float, int] | None = None

    @property
    def self_distillation(self) -> bool:
        """``model.teacher=self``: the student's own weights score, reading privileged context."""
        return isinstance(self.teacher_spec, SelfTeacher)

    @property
    def cross_vocab_teacher(self) -> bool:
        """``model.teacher.cross_vocab``: a teacher with its own tokenizer scores the response text."""
        return bool(getattr(self.teacher_spec, "cross_vocab", False))

    @property
    def teacher_reads_its_own_input(self) -> bool:
        """Whether the teacher reads another prompt or tokenisation than the student (self-distillation, a
        cross-vocabulary teacher, or ``data.teacher_context``): full-vocabulary comparisons with the student (GKD,
        SFT on teacher samples, the exact-KL diagnostics) do not apply."""
        return self.self_distillation or self.cross_vocab_teacher or self.teacher_context

    def use_teacher_prompts(self) -> None:
        """The data gives the teacher a prompt of its own (``data.teacher_context``): only objectives that score
        the sampled tokens through ``Scorer.teacher_logp`` read it (``src/train.py`` calls this)."""
        self.teacher_context = True
        self._check_teacher_input()

    def _check_teacher_input(self) -> None:
        if not (self.teacher_reads_its_own_input and self.objective.needs_teacher):
            return
        why = "model.teacher=self" if self.self_distillation else "model.teacher.cross_vocab" \
            if self.cross_vocab_teacher else "data.teacher_context"
        # the teacher's prompt or tokens differ from the student's: only the sampled-token reward scores them
        if not getattr(self.objective, "scores_sampled_tokens", False):
            raise ValueError(f"{why} gives the teacher its own input, which only the sampled tokens' log-ratio "
                             f"reads: it needs an on-policy objective with the log-ratio reward (algorithm=reopold, "
                             f"opd or an ablation), not {type(self.objective).__name__}")
        if self.grad_cosine_every:
            raise ValueError(f"module.grad_cosine_every compares with the exact reverse KL over one shared vocabulary "
                             f"and prompt: set it to 0 with {why}")

    # ---------------------------------------------------------------- models
    def configure_model(self) -> None:
        if self._trainer is not None:  # also for a module whose models were loaded before the Trainer came
            fitting = self.trainer.state.fn == "fit"
            check_strategy(self.trainer.strategy, self.grad_clip if fitting else None)
            check_sharding(getattr(self.trainer, "strategy", None), self.objective, self.rollout,
                           self.objective.micro_batch_tokens)
            if self.grad_cosine_every and (self._fsdp2() is not None or self._deepspeed()):
                raise ValueError("module.grad_cosine_every reads hidden states outside a forward, which a sharded "
                                 "model does not allow: set it to 0 under this strategy")
            if self.self_distillation and (self._fsdp2() is not None or self._deepspeed()):
                raise ValueError("model.teacher=self runs on unsharded strategies (trainer=cpu, gpu or ddp): the "
                                 "teacher's copy of the student's weights is not planned for sharding")
        if self.student is not None:
            return
        self.tokenizer = self.student_spec.load_tokenizer()
        self.processor = self.student_spec.load_processor()  # the tokenizer itself for text-only models
        needs_teacher = self.teacher_spec is not None and self.objective.needs_teacher
        shared_vocab = None  # set by the preflight where the pair's output heads differ in padding rows
        cross_vocab = None  # a teacher with its own tokenizer scores the response text
        if needs_teacher and self.cross_vocab_teacher:
            if hasattr(self.rollout, "max_turns") or vision_token_ids(self.processor):
                raise ValueError(f"{self.teacher_spec.key}.cross_vocab scores text responses: not tool episodes "
                                 "(rollout=tools) or vision-language models")
            teacher_tok = self.teacher_spec.load_tokenizer()
            preflight_cross_vocab(self.tokenizer, teacher_tok, self.student_spec.key, self.teacher_spec.key)
        elif needs_teacher and not self.self_distillation:
            # before any weights are read: tokenizers, templates, and output rows from the configs
            shared_vocab = preflight(self.student_spec.load_empty(), self.tokenizer, self.teacher_spec.load_empty(),
                                     self.teacher_spec.load_tokenizer(), self.student_spec.key, self.teacher_spec.key)
            preflight_processors(self.processor, self.teacher_spec.load_processor(), self.student_spec.key,
                                 self.teacher_spec.key)
            preflight_dtypes(self.student_spec, self.teacher_spec)
        self.student = self._load(self.student_spec, sharded=True)
        # counted now, before a sharding strategy flattens or partitions the weights (meta.json, FLOP counts)
        self.student_n_params = count_params(self.student)
        if (message := nonfinite_parameters(self.student, self.student_spec.key)) is not None:
            raise ValueError(f"preflight: {message} ({self.student_spec.path})")
        self.student.train()  # from_pretrained returns eval mode
        if needs_teacher and self.self_distillation:
            self.teacher = self.teacher_spec.build(self.student)  # None: the student's current weights score
            if not self.teacher_context and self.teacher is None:
                print("[preflight] model.teacher=self with no data.teacher_context: the teacher reads what the "
                      "student reads, so every reward is 0 (up to rounding)")
            print(f"[preflight] model.teacher=self: the student's {self.teacher_spec.weights} weights score its "
                  "samples, reading the teacher's prompt")
        elif needs_teacher:
            strategy = self._fsdp2()
            sharded = strategy is not None and strategy.plan.teacher_placement == "sharded"
            teacher = self._load(self.teacher_spec, sharded=sharded)
            teacher.requires_grad_(False)
            teacher.eval()
            if (message := nonfinite_parameters(teacher, self.teacher_spec.key)) is not None:
                raise ValueError(f"preflight: {message} ({self.teacher_spec.path})")
            self.teacher = teacher
        self._check_positions()
        banned = vision_token_ids(self.processor)
        banned_ids = torch.tensor(banned, dtype=torch.long) if banned else None
        if needs_teacher and self.cross_vocab_teacher:
            cross_vocab = CrossVocabTeacher(self.tokenizer, teacher_tok, self.eos_token_ids(),
                                            getattr(self.teacher_spec, "cross_vocab_rule", "last"))
        scoring_teacher = self.student if needs_teacher and self.teacher is None and self.self_distillation \
            else self.teacher
        self.scorer = Scorer(self.student, scoring_teacher, self.rollout.temperature, self.chunk_size, self.backbone,
                             banned_ids, self.objective.micro_batch_tokens, vocab_size=shared_vocab,
                             cross_vocab=cross_vocab)
        self._shard()
        self.rollout.bind(self.tokenizer, self.scorer, self._compute_dtype())
        if shared_vocab is not None:  # the student's padding rows past the shared tokenizer are never sampled
            padding = list(range(shared_vocab, self.student.get_output_embeddings().weight.shape[0]))
            banned_ids = torch.tensor(sorted(set(banned) | set(padding)), dtype=torch.long) if banned or padding \
                else None
        self.sampler = Sampler(self.rollout, self.tokenizer, self.eos_token_ids(), banned_ids, self.step_seed,
                               run=self.scorer.run)

    def _check_positions(self) -> None:
        """Each split's longest prompt plus its token budget must fit the models' positions (before step 0)."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None or not hasattr(datamodule, "longest_prompts"):
            return
        limits = {spec.key: getattr(model.config.get_text_config(), "max_position_embeddings", None)
                  for spec, model in ((self.student_spec, self.student), (self.teacher_spec, self.teacher))
                  if model is not None}
        limits = {k: v for k, v in limits.items() if v}
        if not limits:
            return
        key, positions = min(limits.items(), key=lambda kv: kv[1])
        for split, (n, row) in datamodule.longest_prompts().items():
            budget, name = ((self.rollout.max_new_tokens, "rollout.max_new_tokens") if split == "train" else
                            (self.rollout.val_max_new_tokens, "rollout.val_max_new_tokens"))
            if n >= positions:
                raise ValueError(f"data.{split}: row {row!r} has a prompt of {n} tokens, as many as {key}'s "
                                 f"max_position_embeddings ({positions}) or more: shorten or drop such prompts "
                                 f"(data.max_prompt_tokens names them when the data loads)")
            if n + budget > positions:
                raise ValueError(f"data.{split}: row {row!r} has a prompt of {n} tokens; with {name}={budget} a "
                                 f"sequence reaches {n + budget} positions, past {key}'s max_position_embeddings "
                                 f"({positions}). Lower {name} to {positions - n} or less, or shorten the prompts "
                                 f"(data.max_prompt_tokens names longer ones when the data loads)")
        # the teacher's own prompts (privileged context, its chat template) against the model that scores them
        scorer_model = self.teacher if self.teacher is not None else self.student
        t_positions = getattr(scorer_model.config.get_text_config(), "max_position_embeddings", None)
        if self.teacher_spec is not None and t_positions and hasattr(datamodule, "longest_teacher_prompts"):
            budget = self.rollout.max_new_tokens
            for split, (n, row) in datamodule.longest_teacher_prompts().items():
                if n + budget > t_positions:
                    raise ValueError(f"data.{split}: row {row!r} gives the teacher a prompt of {n} tokens "
                                     f"(data.teacher_context or its chat template); with rollout.max_new_tokens="
                                     f"{budget} it reaches {n + budget} positions, past {self.teacher_spec.key}'s "
                                     f"max_position_embeddings ({t_positions}). Shorten the context or the budget")

    def _deepspeed(self) -> bool:
        from lightning.pytorch.strategies import DeepSpeedStrategy

        return isinstance(getattr(self._trainer, "strategy", None), DeepSpeedStrategy)

    def _fsdp2(self) -> FSDP2Strategy | None:
        strategy = getattr(self._trainer, "strategy", None)
        return strategy if isinstance(strategy, FSDP2Strategy) else None

    def _load(self, spec, sharded: bool):
        """``spec``'s model; under FSDP2 a model to be sharded is read by rank 0 only, the others build it empty
        (``FSDP2Strategy.loads_empty``) and receive their shards when it is sharded."""
        strategy = self._fsdp2()
        return spec.load_empty() if strategy is not None and strategy.loads_empty(sharded) else spec.load_model()

    def _shard(self) -> None:
        """Under ``trainer=fsdp2``: the student's and the teacher's ``ScoredModel`` sharded by the strategy's plan
        (``src/modules/sharding.py``); under any other strategy nothing."""
        strategy = self._fsdp2()
        if strategy is None:
            return
        strategy.shard(self.scorer.scored(self.student), trainable=True)
        if self.teacher is not None and strategy.plan.teacher_placement == "sharded":
            strategy.shard(self.scorer.scored(self.teacher), trainable=False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # Lightning calls .train() on the whole module; the teacher never trains
        return self

    def on_load_checkpoint(self, checkpoint) -> None:
        if self.self_distillation and self.teacher_spec.weights == "ema" and self.teacher is not None:
            if "ema_teacher" in checkpoint:
                self.teacher.load_state_dict(checkpoint["ema_teacher"])  # the average continues where it stopped
            elif isinstance(checkpoint.get("state_dict"), dict):  # saved by a run without one: start it here
                student = {k.removeprefix("student."): v for k, v in checkpoint["state_dict"].items()
                           if k.startswith("student.")}
                self.teacher.load_state_dict(student)
                warnings.warn("the checkpoint holds no EMA teacher (module.self_teacher.weights was not ema when it "
                              "was saved): the average starts from the resumed student", stacklevel=2)
        # strict_loading is off for the teacher's sake; the student must still be complete (a distributed checkpoint
        # is loaded into the module by the strategy itself, which reports missing keys)
        if self.student is not None and isinstance(checkpoint.get("state_dict"), dict):
            state, where = checkpoint["state_dict"], getattr(self._trainer, "ckpt_path", None) or "the checkpoint"
            missing = [f"student.{k}" for k in self.student.state_dict() if f"student.{k}" not in state]
            if missing:
                raise KeyError(f"{where} lacks {len(missing)} student weights, e.g. {missing[:3]}")
            shapes = [f"{k}: {tuple(state[f'student.{k}'].shape)} in the checkpoint, {tuple(v.shape)} here"
                      for k, v in self.student.state_dict().items()
                      if hasattr(state[f"student.{k}"], "shape") and tuple(state[f"student.{k}"].shape) != tuple(v.shape)]
            if shapes:
                raise ValueError(f"{where} holds a student of another shape ({len(shapes)} tensors differ, e.g. "
                                 f"{'; '.join(shapes[:2])}): it was saved with another model.student")
            bad = nonfinite_tensors({k: v for k, v in state.items() if k.startswith("student.")})
            if bad:
                raise NonFiniteError(f"{where} holds NaN or inf in {len(bad)} student tensor(s), e.g. {bad[:3]}: it is "
                                     f"corrupt or was saved from a run that diverged")

    def on_save_checkpoint(self, checkpoint) -> None:
        sd = checkpoint["state_dict"]
        for k in [k for k in sd if k.startswith(self.not_checkpointed)]:
            del sd[k]
        if self.self_distillation and self.teacher_spec.weights == "ema" and self.teacher is not None:
            checkpoint["ema_teacher"] = {k: v.detach().clone() for k, v in self.teacher.state_dict().items()}
        bad = nonfinite_tensors(sd)
        if bad:  # the guards keep NaN out of the gradients; an optimiser step can still overflow (a huge lr)
            raise NonFiniteError(f"step {self.trainer.global_step}: the student's weights hold NaN or inf in "
                                 f"{len(bad)} tensor(s), e.g. {bad[:3]}; no checkpoint is written. Lower "
                                 f"module.optimizer.lr or set module.grad_clip")

    def eos_token_ids(self) -> list[int]:
        """The tokenizer's EOS and the student's generation config's (a list or one id)."""
        ids = {self.tokenizer.eos_token_id}
        gen_eos = getattr(self.student.generation_config, "eos_token_id", None)
        ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        return sorted(i for i in ids if i is not None)

    @property
    def updates_per_rollout(self) -> int:
        return self.objective.epochs * self.objective.minibatches

    def step_seed(self, eval_batch: int | None = None) -> int:
        """Sampling seed of this rollout step and rank: resumed runs replay uninterrupted ones exactly.
        Evaluation batches get their own streams (``eval_batch``), so samples are independent across them."""
        step = self.trainer.global_step // self.updates_per_rollout if self._trainer is not None else 0
        rank = self.trainer.global_rank if self._trainer is not None else 0
        salt = 0 if eval_batch is None else 7_919 * (eval_batch + 1)
        return (self.seed * 1_000_003 + step * 1_009 + rank + salt) % (2**63)

    # ---------------------------------------------------------------- training
    def training_step(self, batch, batch_idx):
        step_start = time.perf_counter()
        peaks = PhasePeaks(self.device)  # train/peak_gb_<phase> on a GPU, the phases of the memory plan
        with peaks("rollout"):
            ro = self.objective.rollout(batch, self.sampler, self.scorer)
        with peaks("teacher_scoring"):
            self.objective.prepare(ro, self.scorer, self.selection)
        step = self.trainer.global_step
        bad = self.guard.rollout_source(ro)
        if bad is not None:
            self.guard.bad_step(step, bad, can_skip=not self._deepspeed())  # raises under policy=stop
        elif ro.loss_mask_BT is not None:
            self.guard.kept_tokens(step, int(ro.loss_mask_BT.sum()))
        start = time.perf_counter()
        with peaks("update"):
            logs, n_updates = self._skip_update() if bad is not None else self._update(ro)
        logs.update(self._step_metrics(ro, n_updates, time.perf_counter() - start))
        logs.update(peaks.logs)
        logs["skipped_steps"] = float(self.guard.skipped)
        logs["step_s"] = time.perf_counter() - step_start  # the whole step: rollout, scoring, update(s)
        logs = over_ranks(logs, summed=("samples", "rollout_tok_per_s", "train_tok_per_s"))
        if "grad_cos_exact_rkl" in logs:  # on some steps only: Lightning would repeat its last value on the others
            cosine = {"train/grad_cos_exact_rkl": float(logs.pop("grad_cos_exact_rkl"))}
            for logger in self.loggers if self.trainer.is_global_zero else []:
                logger.log_metrics(cosine, step=step)
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, prog_bar=False, batch_size=ro.input_ids.shape[0])
        self.log("train/loss_step", logs["loss"], prog_bar=True, logger=False)
        return logs["loss"]

    def _update(self, ro) -> tuple[dict, int]:
        """``epochs * minibatches`` optimiser steps on the objective's loss; the last one's loss and metrics."""
        opt, sched = self.optimizers(), self.lr_schedulers()
        shuffle = torch.Generator().manual_seed(self.step_seed())
        logs, n_updates = {}, 0
        step = self.trainer.global_step // self.updates_per_rollout
        cosine_step = self.grad_cosine_every and step % self.grad_cosine_every == 0
        for _ in range(self.objective.epochs):
            for mb in ro.minibatches(self.objective.minibatches, shuffle):
                opt.zero_grad(set_to_none=True)
                loss, metrics = accumulate(self.objective, mb, self.scorer, self.manual_backward)
                if cosine_step and n_updates == 0:  # the step's first update
                    metrics["grad_cos_exact_rkl"] = exact_reverse_kl_cosine(self.scorer, mb,
                                                                            list(self.student.parameters()))
                grads = [p.grad for p in self.student.parameters() if p.grad is not None]
                if grads:  # empty under DeepSpeed, which keeps gradients in its own buffers
                    logs["grad_norm"] = full(torch.nn.utils.get_total_norm(grads))  # FSDP2: over every shard
                if self.grad_clip:
                    norm = self._clip_gradients(opt)
                    if norm is not None:  # the global norm before clipping, unscaled
                        logs["grad_norm"] = full(norm)
                bad = self.guard.update_source(loss, logs.get("grad_norm") if grads or self.grad_clip else None)
                if bad is not None:
                    self.guard.bad_step(self.trainer.global_step, bad, can_skip=not self._deepspeed())
                    opt.zero_grad(set_to_none=True)  # skipped: the step below moves no weight and no state
                else:
                    self.guard.good_step()
                opt.step()
                if sched is not None:
                    sched.step()
                self._check_weights()
                if self.self_distillation and self.teacher is not None:
                    self.teacher_spec.update(self.teacher, self.student)  # the EMA copy follows
                n_updates += 1
                logs.update({"loss": loss.detach(), **metrics})
        logs["lr"] = opt.param_groups[0]["lr"]
        return logs, n_updates

    def _check_weights(self) -> None:
        """Stop when an optimiser step made the student's weights non-finite (finite gradients, a huge step): the
        next rollout would sample from NaN probabilities, and no checkpoint may hold them."""
        bad = nonfinite_tensors(dict(self.student.named_parameters()))
        if bad:
            raise NonFiniteError(f"step {self.trainer.global_step}: the optimiser step left NaN or inf in "
                                 f"{len(bad)} student tensor(s), e.g. {bad[:3]}, from finite gradients: the step was "
                                 f"too large. Lower module.optimizer.lr (now {self.optimizers().param_groups[0]['lr']:g}) "
                                 f"or set module.grad_clip")

    def on_train_end(self) -> None:
        self.guard.summary(self.trainer.global_step // max(self.updates_per_rollout, 1))

    def _skip_update(self) -> tuple[dict, int]:
        """A dropped step (``module.nonfinite.policy=skip``): the optimiser steps with no gradients, so no weight and
        no optimiser state moves, while the step counter, the data stream and the schedule advance as usual."""
        opt, sched = self.optimizers(), self.lr_schedulers()
        for _ in range(self.updates_per_rollout):
            opt.zero_grad(set_to_none=True)
            opt.step()
            if sched is not None:
                sched.step()
        nan = torch.tensor(float("nan"))
        return {"loss": nan, "lr": opt.param_groups[0]["lr"]}, self.updates_per_rollout

    @staticmethod
    def _step_metrics(ro, n_updates: int, train_seconds: float) -> dict:
        valid = ro.response_mask_BT
        n_tok = ro.num_response_tokens
        logs = dict(ro.metrics)
        if ro.entropy_BT is not None:
            logs["entropy"] = (ro.entropy_BT * valid).sum() / valid.sum().clamp(min=1)
        logs.update({
            "response_len": valid.sum(-1).float().mean(),
            "truncation_rate": ro.truncated_B.float().mean(),
            "rollout_tok_per_s": n_tok / ro.seconds if ro.seconds > 0 else float("nan"),
            "train_tok_per_s": n_tok * n_updates / max(train_seconds, 1e-9),
            "samples": float(valid.shape[0]),
        })
        return logs

    # ---------------------------------------------------------------- evaluation
    def _evaluate(self, batch, stage: str, batch_idx: int = 0) -> None:
        logged = self.evaluator.step(self.sampler, self.student, batch, batch_idx)
        n = len(batch["references"])
        for name, metric in logged.items():
            self.log(f"{stage}/{self.task}/{name}", metric, prog_bar=name == "acc", batch_size=n)

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val", batch_idx)

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test", batch_idx)

    def on_validation_epoch_start(self) -> None:
        self.evaluator.records = []  # the records of the latest evaluation only
        self._announce_evaluation("val")

    def on_test_epoch_start(self) -> None:
        self.evaluator.records = []
        self._announce_evaluation("test")

    def on_validation_epoch_end(self) -> None:
        self._time_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self._time_evaluation("test")

    def _announce_evaluation(self, stage: str) -> None:
        """One line before an evaluation: how many prompts, how many responses each, and how long the last one of
        this split took per prompt times this one's size (a real model's full split can take hours)."""
        loaders = self.trainer.val_dataloaders if stage == "val" else self.trainer.test_dataloaders
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        n = sum(len(loader.dataset) for loader in loaders if loader is not None and hasattr(loader, "dataset"))
        seconds = self._eval_seconds_per_prompt.get(stage)
        total = seconds * n if seconds else None
        took = None if total is None else f"{total:.0f} s" if total < 90 else f"{total / 60:.1f} min"
        estimate = f"; about {took} at the last {stage} evaluation's pace" if took else ""
        k = self.evaluator.eval_samples
        if self.trainer.is_global_zero:
            print(f"[{stage}] step {self.global_step}: {n} prompts, greedy{f' + {k} samples' if k else ''} each, up "
                  f"to {self.rollout.val_max_new_tokens} new tokens{estimate}", flush=True)
        self._eval_started = (time.perf_counter(), n)

    def _time_evaluation(self, stage: str) -> None:
        if self._eval_started is not None and self._eval_started[1]:
            started, n = self._eval_started
            self._eval_seconds_per_prompt[stage] = (time.perf_counter() - started) / n

    # ---------------------------------------------------------------- optimisation
    def _compute_dtype(self) -> torch.dtype | None:
        """The dtype the student computes in: the sharding plan's under FSDP2, else the trainer's precision's under
        autocast (None: the weights' own)."""
        strategy = self._fsdp2()
        if strategy is not None:
            return DTYPES[strategy.plan.param_dtype]
        precision = str(self.trainer.precision) if self._trainer is not None else ""
        return {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)

    def _clip_gradients(self, opt) -> torch.Tensor | None:
        """Clips the student's gradients to a global norm of ``grad_clip``; returns the norm before clipping
        (unscaled, across shards) where this method takes it, None where Lightning does.

        - Mixed precision with an optimiser that unscales inside its step (fused AdamW, the default):
          Lightning's plugin refuses, for fear of clipping scaled gradients. bf16-mixed scales nothing;
          16-mixed's scaler unscales them first (the scaler's step then knows they are unscaled). After DDP's
          all-reduce every rank holds the same, global, gradients.
        - Where the gradients stay scaled until the step (16-mixed with a foreach optimiser), the threshold is
          scaled alike: the same clip factor, and an inf norm leaves NaNs the scaler skips.
        - Otherwise the strategy's own clipping. DeepSpeed clips through its config instead."""
        from lightning.pytorch.plugins.precision import MixedPrecision

        plugin = self.trainer.precision_plugin
        inner = getattr(opt, "optimizer", opt)
        scaler = getattr(plugin, "scaler", None)
        scale = scaler.get_scale() if scaler is not None else 1.0
        if isinstance(plugin, MixedPrecision):
            params = [p for g in inner.param_groups for p in g["params"]]
            if scaler is not None and getattr(inner, "_step_supports_amp_scaling", False):
                scaler.unscale_(inner)
                scale = 1.0
            return torch.nn.utils.clip_grad_norm_(params, self.grad_clip * scale) / scale
        self.clip_gradients(opt, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")
        return None

    def configure_optimizers(self):
        lr = getattr(self.optimizer_fn, "keywords", {}).get("lr")
        if lr is not None and not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"module.optimizer.lr must be a positive number, got {lr!r}")
        if lr is not None and lr > 0.1:
            warnings.warn(f"module.optimizer.lr={lr:g} is far above what fine-tuning a language model takes "
                          f"(1e-6 to 1e-3): the weights may blow up", stacklevel=1)
        opt = self.optimizer_fn(params=[p for p in self.student.parameters() if p.requires_grad])
        if self.scheduler_fn is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler_fn(optimizer=opt), "interval": "step"}}
