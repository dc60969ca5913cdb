"""Evaluation of a policy on prompt batches: greedy decoding graded against the references, and optionally ``k``
samples per prompt at the rollout temperature for ``avg@k``, ``pass@k`` (k = 1, 2, 4, ..., k) and ``maj@k``.

The metrics are ``torchmetrics`` objects, so they aggregate across data-parallel ranks and over an evaluation's
batches; tool-use episodes add their statistics (tool calls per episode, malformed and failed calls, turns).
With ``record_samples`` every evaluated response is kept as a row for the offline test-time-scaling analysis
(``src/eval.py`` writes them to ``samples.jsonl``).
"""

from __future__ import annotations

import torch
from torchmetrics import MeanMetric

from src.modules.evaluation.metrics import AvgAtK, MajAtK, PassAtK, Ratio, default_ks
from src.modules.rollout.tools import TOOL_STATS, episode_totals


class Evaluator(torch.nn.Module):
    """
    Args:
        grader: ``(response, reference) -> bool``.
        answer_fn: ``response -> str | None``, the final answer a majority vote counts.
        eval_samples: k sampled responses per prompt besides the greedy one (0: greedy only).
        record_samples: keep every evaluated response in ``records``.
    """

    def __init__(self, grader, answer_fn, eval_samples: int = 0, record_samples: bool = False):
        super().__init__()
        if eval_samples < 0:
            raise ValueError(f"module.eval_samples must be >= 0, got {eval_samples}")
        self.grader, self.answer_fn = grader, answer_fn
        self.eval_samples, self.record_samples, self.records = eval_samples, record_samples, []
        self.acc, self.response_len, self.truncation_rate = MeanMetric(), MeanMetric(), MeanMetric()
        self.tools = torch.nn.ModuleDict({name.replace("/", "_"): Ratio() for name, _, _ in TOOL_STATS})
        if eval_samples:
            self.avg = AvgAtK()
            self.pass_at = torch.nn.ModuleDict({str(k): PassAtK(k) for k in default_ks(eval_samples)})
            self.maj = MajAtK(eval_samples)

    def grade(self, ro) -> torch.Tensor:
        """1.0 where a response is right, per row of ``ro``."""
        return torch.tensor([float(self.grader(r, ref)) for r, ref in zip(ro.response_texts, ro.references)])

    def step(self, sampler, policy, batch: dict, batch_idx: int) -> dict:
        """Evaluates ``policy`` on ``batch``; returns ``{metric name: torchmetrics object}`` to log (updated with
        this batch)."""
        ro = sampler(policy, batch, greedy=True)
        correct = self.grade(ro)
        self.acc.update(correct)
        self.response_len.update(ro.response_mask_BT.sum(-1).float())
        self.truncation_rate.update(ro.truncated_B.float())
        logged = {"acc": self.acc, "response_len": self.response_len, "truncation_rate": self.truncation_rate}
        totals = episode_totals(ro)
        if totals is not None:
            for name, num, den in TOOL_STATS:
                metric = self.tools[name.replace("/", "_")]
                metric.update(totals[num], totals[den])
                logged[name] = metric
        self._record(batch, ro, correct, sample=None)
        if self.eval_samples:
            logged.update(self._sampled(sampler, policy, batch, batch_idx))
        return logged

    def _sampled(self, sampler, policy, batch: dict, batch_idx: int) -> dict:
        k, n = self.eval_samples, len(batch["references"])
        ro = sampler(policy, batch, num_samples=k, max_new_tokens=sampler.backend.val_max_new_tokens,
                     eval_batch=batch_idx)
        correct_PG = self.grade(ro).bool().view(n, k)
        answers = [self.answer_fn(r) for r in ro.response_texts]
        self.avg.update(correct_PG)
        logged = {f"avg@{k}": self.avg}
        for kk, metric in self.pass_at.items():
            metric.update(correct_PG)
            logged[f"pass@{kk}"] = metric
        self.maj.update([answers[i * k:(i + 1) * k] for i in range(n)], correct_PG)
        logged[f"maj@{k}"] = self.maj
        self._record(batch, ro, correct_PG.flatten().float(), sample=k, answers=answers)
        return logged

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
