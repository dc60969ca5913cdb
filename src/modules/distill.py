"""The LightningModule: a trainable student, a frozen teacher, and injected components.

One training step (paper Sec. 5):
    1. rollout   - the rollout policy (the student; the teacher for SFT) samples G responses per prompt;
    2. prepare   - the objective scores the batch without gradient (teacher log-probs, reward, clip,
                   token selection) and fills the batch metrics;
    3. update    - ``epochs * minibatches`` optimiser steps on the surrogate loss (manual optimisation,
                   so several steps can follow one rollout).
The token selection in force is ``self.selection``; the phase callback swaps it (exploration ->
refinement). Nothing in the step branches on a mode string: every choice is a component.

The teacher runs under ``torch.no_grad`` in eval mode with ``requires_grad=False``, in its own dtype,
and is left out of checkpoints (it is reloaded from its spec).
"""

from __future__ import annotations

import inspect
import time

import torch
from lightning import LightningModule
from torchmetrics import MeanMetric

from src.modules.fast_score import FusedScorer
from src.modules.metrics import AvgAtK, MajAtK, PassAtK, Ratio, default_ks
from src.modules.models import preflight
from src.modules.multimodal import preflight_processors, vision_token_ids
from src.modules.sampling import AllTokens
from src.modules.scoring import response_hidden, score_response
from src.modules.strategies import check_strategy, over_ranks
from src.modules.tool_rollout import TOOL_STATS, episode_totals
from src.utils.sharding import count_params


class DistillationModule(LightningModule):
    """
    Args:
        student: spec with ``load_model()`` / ``load_tokenizer()`` (``PretrainedLM``, ``TinyQwen2``).
        teacher: spec of the frozen teacher, or None when the objective needs none (GRPO).
        rollout: rollout backend (``HFGenerateRollout``).
        objective: ``PolicyGradient``, ``GeneralizedJSD`` or ``SupervisedDistillation``.
        optimizer: partial ``torch.optim`` constructor taking the parameters.
        scheduler: optional partial LR scheduler constructor taking the optimizer (stepped per update).
        selection: token selection in force at the start (the phase callback may replace it).
        grader: ``(response, reference) -> bool`` for validation accuracy.
        answer_fn: ``response -> str | None``, the final answer a majority vote counts.
        task: name used in validation metric keys (``val/<task>/acc``).
        eval_samples: k responses sampled per prompt (at the rollout temperature and the validation token
            budget) besides the greedy one, for ``avg@k``, ``pass@k`` (k = 1, 2, 4, ..., k) and ``maj@k``;
            0 evaluates greedy decoding only.
        record_samples: keep every evaluated response's result in ``self.records`` (``src/eval.py`` writes
            them out for the test-time-scaling analysis).
        chunk_size: tokens per head application in the scorer.
        fused_scoring: score Qwen2 / Llama backbones with ``FusedScorer`` (``src.modules.fast_score``: the same
            hidden states with less work); False runs the Hugging Face forward; ``onednn``: the fused scorer,
            with the frozen teacher's weights reordered once for oneDNN's matmul (``FrozenLinear``: about 10%
            faster teacher scoring on the CPU benchmark, the same log-probs to float rounding).
        grad_clip: max gradient norm (None disables).
    """

    def __init__(self, student, teacher, rollout, objective, optimizer, scheduler=None, selection=None,
                 grader=None, answer_fn=None, task: str = "math", chunk_size: int = 1024,
                 grad_clip: float | None = 1.0, seed: int = 0, eval_samples: int = 0, record_samples: bool = False,
                 fused_scoring: bool | str = True):
        super().__init__()
        self.automatic_optimization = False
        self.strict_loading = False  # the teacher is not in checkpoints
        self.student_spec, self.teacher_spec = student, teacher
        if objective.needs_teacher and teacher is None:
            raise ValueError(f"{type(objective).__name__} needs a teacher but model.teacher is null")
        self.rollout, self.objective = rollout, objective
        self.optimizer_fn, self.scheduler_fn = optimizer, scheduler
        self.selection = selection or AllTokens()
        if grader is None:
            from src.modules.grading import is_correct as grader
        if answer_fn is None:
            from src.modules.grading import final_answer as answer_fn
        self.grader, self.answer_fn, self.task = grader, answer_fn, task
        if eval_samples < 0:
            raise ValueError(f"module.eval_samples must be >= 0, got {eval_samples}")
        self.eval_samples, self.record_samples, self.records = eval_samples, record_samples, []
        self.chunk_size, self.grad_clip, self.seed = chunk_size, grad_clip, seed
        if fused_scoring not in (True, False, "onednn"):
            raise ValueError(f"module.fused_scoring must be true, false or onednn, got {fused_scoring!r}")
        self.fused_scoring = fused_scoring
        self.temperature = rollout.temperature
        self.student = self.teacher = self.tokenizer = self.processor = self.banned_ids = None
        self.student_n_params = None  # set by configure_model
        self.val_acc = MeanMetric()
        self.val_len = MeanMetric()
        self.val_trunc = MeanMetric()
        # a tool-use rollout's episode statistics, pooled over the evaluation (unused by other rollouts)
        self.val_tools = torch.nn.ModuleDict({name.replace("/", "_"): Ratio() for name, _, _ in TOOL_STATS})
        if eval_samples:
            self.val_avg = AvgAtK()
            self.val_pass = torch.nn.ModuleDict({str(k): PassAtK(k) for k in default_ks(eval_samples)})
            self.val_maj = MajAtK(eval_samples)

    # ---------------------------------------------------------------- models
    def configure_model(self) -> None:
        if self._trainer is not None:  # also for a module whose models were loaded before the Trainer came
            fitting = self.trainer.state.fn == "fit"
            check_strategy(self.trainer.strategy, self.grad_clip if fitting else None)
        if self.student is not None:
            return
        self.tokenizer = self.student_spec.load_tokenizer()
        self.processor = self.student_spec.load_processor()  # the tokenizer itself for text-only models
        if hasattr(self.rollout, "set_tokenizer"):  # a multi-turn rollout decodes turns and encodes replies
            self.rollout.set_tokenizer(self.tokenizer)
        self.student = self.student_spec.load_model()
        # counted now, before a sharding strategy flattens or partitions the weights (meta.json, FLOP counts)
        self.student_n_params = count_params(self.student)
        banned = vision_token_ids(self.processor)
        self.banned_ids = torch.tensor(banned, dtype=torch.long) if banned else None
        self.student.train()  # from_pretrained returns eval mode
        if hasattr(self.rollout, "bind"):  # an engine that mirrors the student (vLLM), in the dtype it computes in
            self.rollout.bind(self.student, self._compute_dtype())
        if self.teacher_spec is not None and self.objective.needs_teacher:
            teacher = self.teacher_spec.load_model()
            teacher.requires_grad_(False)
            teacher.eval()
            preflight(self.student, self.tokenizer, teacher, self.teacher_spec.load_tokenizer(),
                      self.student_spec.key, self.teacher_spec.key)
            preflight_processors(self.processor, self.teacher_spec.load_processor(), self.student_spec.key,
                                 self.teacher_spec.key)
            self.teacher = teacher

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # Lightning calls .train() on the whole module; the teacher never trains
        return self

    def on_load_checkpoint(self, checkpoint) -> None:
        # strict_loading is off for the teacher's sake; the student must still be complete
        if self.student is not None:
            missing = [f"student.{k}" for k in self.student.state_dict() if f"student.{k}" not in checkpoint["state_dict"]]
            if missing:
                raise KeyError(f"checkpoint lacks {len(missing)} student weights, e.g. {missing[:3]}")

    def on_save_checkpoint(self, checkpoint) -> None:
        sd = checkpoint["state_dict"]
        for k in [k for k in sd if k.startswith("teacher.")]:
            del sd[k]

    @property
    def eos_token_ids(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id}
        gen_eos = getattr(self.student.generation_config, "eos_token_id", None)
        ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        return sorted(i for i in ids if i is not None)

    # ---------------------------------------------------------------- scoring (used by objectives)
    def teacher_logp(self, ro) -> torch.Tensor:
        with torch.no_grad():
            logp_BT, _ = score_response(self.teacher, ro.input_ids, ro.attention_mask, ro.response_start,
                                        self.temperature, self.chunk_size, with_entropy=False,
                                        banned_ids=self.banned_ids, fused=self.fused_scoring, **ro.model_kwargs)
        return logp_BT * ro.response_mask_BT

    @staticmethod
    def _take_prompt_state(ro):
        """The rollout's prefill graph, handed out once (a backward frees it); the scorer checks that it still
        matches the prompts and the weights, and runs the whole sequence where it does not."""
        state, ro.prompt_state = ro.prompt_state, None
        return state

    def student_scores(self, ro, with_entropy: bool = False, temperature: float | None = None):
        """Student log-probs (and entropies) of the response; at the rollout temperature unless given."""
        return score_response(self.student, ro.input_ids, ro.attention_mask, ro.response_start,
                              temperature or self.temperature, self.chunk_size, with_entropy=with_entropy,
                              banned_ids=self.banned_ids, fused=self.fused_scoring,
                              prompt_state=self._take_prompt_state(ro), **ro.model_kwargs)

    def student_hidden(self, ro):
        h = response_hidden(self.student, ro.input_ids, ro.attention_mask, ro.response_start, self.fused_scoring,
                            prompt_state=self._take_prompt_state(ro), **ro.model_kwargs)
        return h, self.student.get_output_embeddings()

    def teacher_hidden(self, ro):
        h = response_hidden(self.teacher, ro.input_ids, ro.attention_mask, ro.response_start, self.fused_scoring,
                            **ro.model_kwargs)
        return h, self.teacher.get_output_embeddings()

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

    # ---------------------------------------------------------------- steps
    def _keeps_prompt_graph(self, policy, greedy: bool) -> bool:
        """Whether a training rollout should keep its prefill's graph for the student's scoring (the prompt's
        forward then runs once, not twice): the student samples, the first update scores the whole batch with
        the fused scorer, and the rollout backend offers it."""
        if not (policy is self.student and not greedy and self.fused_scoring and torch.is_grad_enabled()
                and self.objective.minibatches == 1
                and "keep_prompt_graph" in inspect.signature(self.rollout.__call__).parameters):
            return False
        scorer = FusedScorer.for_model(policy)  # None where the fused scorer does not apply
        return scorer is not None and scorer.static_rope()

    def generate(self, batch, greedy: bool = False, policy=None, eval_batch: int | None = None,
                 keep_prompt_graph: bool = False, **rollout_kwargs):
        """A rollout of ``batch`` by ``policy`` (the student by default). ``keep_prompt_graph``: where it pays
        (``_keeps_prompt_graph``), the rollout keeps its prefill's graph for the student's scoring."""
        policy = policy or self.student
        if keep_prompt_graph and self._keeps_prompt_graph(policy, greedy):
            rollout_kwargs["keep_prompt_graph"] = True  # decided before policy.eval(): supports() reads train mode
        was_training = policy.training
        policy.eval()
        devices = [self.device] if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(self.step_seed(eval_batch))
                ro = self.rollout(policy, batch["input_ids"], batch["attention_mask"], self.eos_token_ids,
                                  self.tokenizer.pad_token_id, greedy=greedy, banned_ids=self.banned_ids,
                                  **rollout_kwargs,
                                  **batch.get("model_kwargs", {}))
        finally:
            policy.train(was_training)
        ro.references = [r for r in batch["references"] for _ in range(ro.group_size)]
        ro.response_texts = self.tokenizer.batch_decode(
            torch.where(ro.response_mask_BT, ro.response_ids_BT, self.tokenizer.pad_token_id),
            skip_special_tokens=True)
        return ro

    def training_step(self, batch, batch_idx):
        ro = self.objective.make_rollout(self, batch)
        self.objective.prepare(ro, self, self.selection)
        opt = self.optimizers()
        sched = self.lr_schedulers()
        start, n_updates, logs = time.perf_counter(), 0, {}
        shuffle = torch.Generator().manual_seed(self.step_seed())
        for _ in range(self.objective.epochs):
            for mb in ro.minibatches(self.objective.minibatches, shuffle):
                loss, metrics = self.objective.loss(mb, self)
                opt.zero_grad(set_to_none=True)
                self.manual_backward(loss)
                grads = [p.grad for p in self.student.parameters() if p.grad is not None]
                if grads:  # empty under DeepSpeed, which keeps gradients in its own buffers
                    logs["grad_norm"] = torch.nn.utils.get_total_norm(grads)
                if self.grad_clip:
                    norm = self._clip_gradients(opt)
                    if norm is not None:  # the global norm before clipping, unscaled
                        logs["grad_norm"] = norm
                opt.step()
                if sched is not None:
                    sched.step()
                n_updates += 1
                logs.update({"loss": loss.detach(), **metrics})
                ro.prompt_state = None  # the first update's (an objective that scores otherwise leaves it)
        train_seconds = time.perf_counter() - start
        n_tok = ro.num_response_tokens
        valid = ro.response_mask_BT
        logs.update(ro.metrics)
        if ro.entropy_BT is not None:
            logs["entropy"] = (ro.entropy_BT * valid).sum() / valid.sum().clamp(min=1)
        logs.update({
            "response_len": valid.sum(-1).float().mean(),
            "truncation_rate": ro.truncated_B.float().mean(),
            "rollout_tok_per_s": n_tok / ro.seconds if ro.seconds > 0 else float("nan"),
            "train_tok_per_s": n_tok * n_updates / max(train_seconds, 1e-9),
            "lr": opt.param_groups[0]["lr"],
            "samples": float(valid.shape[0]),
        })
        logs = over_ranks(logs, summed=("samples", "rollout_tok_per_s", "train_tok_per_s"))
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, prog_bar=False, batch_size=valid.shape[0])
        self.log("train/loss_step", logs["loss"], prog_bar=True, logger=False)
        return logs["loss"]

    def _evaluate(self, batch, stage: str, batch_idx: int = 0):
        """Greedy decoding (and ``eval_samples`` samples) graded against the references; metrics
        aggregate across DDP ranks."""
        ro = self.generate(batch, greedy=True)
        correct = torch.tensor([float(self.grader(r, ref)) for r, ref in zip(ro.response_texts, ro.references)])
        self.val_acc.update(correct)
        self.val_len.update(ro.response_mask_BT.sum(-1).float())
        self.val_trunc.update(ro.truncated_B.float())
        n = len(correct)
        key = f"{stage}/{self.task}"
        self.log(f"{key}/acc", self.val_acc, prog_bar=True, batch_size=n)
        self.log(f"{key}/response_len", self.val_len, batch_size=n)
        self.log(f"{key}/truncation_rate", self.val_trunc, batch_size=n)
        totals = episode_totals(ro)
        if totals is not None:
            for name, num, den in TOOL_STATS:
                metric = self.val_tools[name.replace("/", "_")]
                metric.update(totals[num], totals[den])
                self.log(f"{key}/{name}", metric, batch_size=n)
        self._record(batch, ro, correct, sample=None)
        if self.eval_samples:
            k = self.eval_samples
            sro = self.generate(batch, num_samples=k, max_new_tokens=self.rollout.val_max_new_tokens,
                                eval_batch=batch_idx)
            correct_PG = torch.tensor([bool(self.grader(r, ref)) for r, ref in zip(sro.response_texts, sro.references)])
            correct_PG = correct_PG.view(n, k)
            answers = [self.answer_fn(r) for r in sro.response_texts]
            answers_PG = [answers[i * k:(i + 1) * k] for i in range(n)]
            self.val_avg.update(correct_PG)
            self.log(f"{key}/avg@{k}", self.val_avg, batch_size=n)
            for kk, metric in self.val_pass.items():
                metric.update(correct_PG)
                self.log(f"{key}/pass@{kk}", metric, batch_size=n)
            self.val_maj.update(answers_PG, correct_PG)
            self.log(f"{key}/maj@{k}", self.val_maj, batch_size=n)
            self._record(batch, sro, correct_PG.flatten().float(), sample=k, answers=answers)
        return correct

    def _record(self, batch, ro, correct, sample: int | None, answers=None) -> None:
        """Per-response results for the offline test-time-scaling analysis (one row per response)."""
        if not self.record_samples:
            return
        G = ro.group_size
        ids = batch["ids"]
        tokens = ro.response_mask_BT.sum(-1).tolist()
        seconds = ro.seconds / max(len(tokens), 1)
        for b, text in enumerate(ro.response_texts):
            self.records.append({
                "prompt_id": ids[b // G], "sample": -1 if sample is None else b % G,
                "answer": answers[b] if answers is not None else self.answer_fn(text),
                "correct": bool(correct[b]), "tokens": int(tokens[b]), "seconds": seconds,
                "truncated": bool(ro.truncated_B[b]), "response": text, "reference": ro.references[b],
            })

    def validation_step(self, batch, batch_idx):
        return self._evaluate(batch, "val", batch_idx)

    def test_step(self, batch, batch_idx):
        return self._evaluate(batch, "test", batch_idx)

    def on_validation_epoch_start(self) -> None:
        self.records = []  # the records of the latest evaluation only

    def on_test_epoch_start(self) -> None:
        self.records = []

    def _compute_dtype(self) -> torch.dtype | None:
        """The dtype the trainer's precision computes in under autocast (None: the weights' own)."""
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
        opt = self.optimizer_fn(params=[p for p in self.student.parameters() if p.requires_grad])
        if self.scheduler_fn is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler_fn(optimizer=opt), "interval": "step"}}
