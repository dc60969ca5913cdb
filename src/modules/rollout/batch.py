"""The rollout batch: prompts (left-padded) followed by the responses a policy sampled, and what the objective
adds to it (teacher log-probs, reward, advantage, token mask, metrics).

``reference_rollout`` builds one from a data set's reference solutions instead of sampling (the SFT stages).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from src.modules.method.losses import max_over_ranks
from src.modules.models.multimodal import kwargs_of_rows


@dataclasses.dataclass
class Rollout:
    """Prompts (left-padded, P columns) followed by responses (right-padded, T columns).

    ``*_BT`` tensors cover the response columns only; ``input_ids``/``attention_mask`` cover P + T.
    """

    input_ids: torch.Tensor  # [B, P + T]
    attention_mask: torch.Tensor  # [B, P + T]; prompt padding and post-EOS padding are 0
    response_start: int  # P
    response_mask_BT: torch.Tensor  # [B, T] bool: tokens the policy sampled, up to and including EOS
    old_logp_BT: torch.Tensor | None  # [B, T] rollout-time log-probs at the sampling temperature
    entropy_BT: torch.Tensor | None  # [B, T] rollout-time full-vocabulary entropy
    truncated_B: torch.Tensor  # [B] bool: no EOS within the token budget
    group_size: int = 1  # G samples per prompt; rows [g*G:(g+1)*G] share a prompt
    seconds: float = 0.0  # wall time of generation
    references: list[str] = dataclasses.field(default_factory=list)
    response_texts: list[str] = dataclasses.field(default_factory=list)
    model_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. pixel values
    tool_counts_BK: torch.Tensor | None = None  # tool rollouts: per episode, rollout.tools.TOOL_COUNTS
    # the teacher's own prompt (left-padded), where it sees another one than the student (its chat template, or
    # privileged context: ``PromptDataModule.teacher_prompts``); None: the student's
    teacher_prompt_ids: torch.Tensor | None = None  # [B, P_t]
    teacher_prompt_mask: torch.Tensor | None = None  # [B, P_t]
    # filled by the objective
    teacher_logp_BT: torch.Tensor | None = None
    # the tokens the teacher's score is credited to (a cross-vocabulary teacher: ``cross_vocab.credited_teacher_logp``);
    # None: every response token
    scored_mask_BT: torch.Tensor | None = None
    reward_BT: torch.Tensor | None = None
    advantage_BT: torch.Tensor | None = None
    loss_mask_BT: torch.Tensor | None = None
    metrics: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    # a micro-batch's (``micro_batches``): the loss mask of the whole batch it belongs to, whose counts normalise its
    # loss, and whether it is a filler (a row of the batch with nothing in the loss, where this rank has fewer rows
    # than micro-batches)
    batch_loss_mask_BT: torch.Tensor | None = None
    filler: bool = False

    @property
    def response_ids_BT(self) -> torch.Tensor:
        return self.input_ids[:, self.response_start :]

    @property
    def num_response_tokens(self) -> int:
        return int(self.response_mask_BT.sum())

    def teacher_view(self) -> Rollout:
        """The rollout as the teacher reads it: its own prompt (``teacher_prompt_ids``) followed by the same response
        tokens; the rollout itself where the teacher reads the student's prompt."""
        if self.teacher_prompt_ids is None:
            return self
        ids_BP = self.teacher_prompt_ids.to(self.input_ids.device)
        mask_BP = self.teacher_prompt_mask.to(self.attention_mask.device, self.attention_mask.dtype)
        return dataclasses.replace(
            self, input_ids=torch.cat([ids_BP, self.response_ids_BT], dim=1),
            attention_mask=torch.cat([mask_BP, self.attention_mask[:, self.response_start:]], dim=1),
            response_start=ids_BP.shape[1], teacher_prompt_ids=None, teacher_prompt_mask=None, metrics={})

    def minibatches(self, n: int, generator: torch.Generator | None = None):
        """Split rows into exactly ``n`` shuffled minibatches (sizes differing by one at most)."""
        B = self.input_ids.shape[0]
        if n <= 1:
            yield self
            return
        if n > B:
            raise ValueError(f"objective.minibatches is {n}, but a rollout on this rank has {B} rows: at most {B}")
        order = torch.randperm(B, generator=generator).to(self.input_ids.device)
        for idx in order.tensor_split(n):
            yield self.select_rows(idx)

    def micro_batches(self, max_tokens: int | None) -> list[Rollout]:
        """The rows in micro-batches of at most ``max_tokens`` padded tokens each (a row is never split; one row
        over the budget is a micro-batch alone), in order. Every data-parallel rank gets as many as the rank that
        needs most (sharded models gather weights in every forward, which all ranks must join); a rank with fewer
        rows than that fills in with ``filler`` micro-batches. Each carries ``batch_loss_mask_BT``.
        ``max_tokens`` None or 0: ``[self]``."""
        B, L = self.input_ids.shape
        if not max_tokens:
            return [self]
        n = max_over_ranks(math.ceil(B / max(1, max_tokens // L)))
        if n == 1:
            return [self]
        parts = []
        for idx in torch.arange(B).tensor_split(n):
            part = self.select_rows(idx if idx.numel() else torch.zeros(1, dtype=torch.long))
            if not idx.numel():
                part.filler = True
                part.loss_mask_BT = None if self.loss_mask_BT is None else torch.zeros_like(part.loss_mask_BT)
            part.batch_loss_mask_BT = self.loss_mask_BT if self.batch_loss_mask_BT is None else self.batch_loss_mask_BT
            parts.append(part)
        return parts

    def select_rows(self, idx: torch.Tensor) -> Rollout:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "batch_loss_mask_BT":
                v = None  # rows of one batch are a batch of their own (a minibatch), unless micro_batches says not
            elif isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == self.input_ids.shape[0]:
                v = v[idx.to(v.device)]  # per-episode counts stay on the CPU
            elif isinstance(v, list) and len(v) == self.input_ids.shape[0]:
                v = [v[i] for i in idx.tolist()]
            elif f.name == "model_kwargs":
                v = kwargs_of_rows(v, idx, self.input_ids.shape[0])
            out[f.name] = v
        out["metrics"] = {}
        return Rollout(**out)


def reference_rollout(batch: dict, eos_token_id: int, pad_token_id: int) -> Rollout:
    """A Rollout whose responses are the batch's reference solutions (``target_ids``) followed by EOS.

    With ``target_mask`` (multi-turn tool-use demonstrations) only the masked tokens and the final EOS are the
    model's (``response_mask_BT``, the SFT loss); the rest (tool responses, template glue) is attended only.
    """
    prompt_ids_BP, prompt_mask_BP = batch["input_ids"], batch["attention_mask"]
    device = prompt_ids_BP.device
    targets = [list(t) + [eos_token_id] for t in batch["target_ids"]]
    masks = [list(m) + [True] for m in batch.get("target_mask", [[True] * (len(t) - 1) for t in targets])]
    T = max(len(t) for t in targets)
    response_BT = torch.full((len(targets), T), pad_token_id, dtype=prompt_ids_BP.dtype)
    written_BT = torch.zeros((len(targets), T), dtype=torch.bool)
    for i, (t, m) in enumerate(zip(targets, masks)):
        if len(m) != len(t):
            raise ValueError(f"row {i}: target_mask has {len(m) - 1} entries for {len(t) - 1} target tokens")
        response_BT[i, : len(t)] = torch.tensor(t, dtype=prompt_ids_BP.dtype)
        written_BT[i, : len(t)] = torch.tensor(m, dtype=torch.bool)
    response_BT, response_mask_BT = response_BT.to(device), written_BT.to(device)
    real_BT = torch.arange(T, device=device)[None, :] < torch.tensor([len(t) for t in targets], device=device)[:, None]
    return Rollout(
        input_ids=torch.cat([prompt_ids_BP, response_BT], dim=1),
        attention_mask=torch.cat([prompt_mask_BP, real_BT.to(prompt_mask_BP.dtype)], dim=1),
        response_start=prompt_ids_BP.shape[1], response_mask_BT=response_mask_BT, old_logp_BT=None,
        entropy_BT=None, truncated_B=torch.zeros(len(targets), dtype=torch.bool, device=device),
        references=list(batch["references"]),
        model_kwargs=batch.get("model_kwargs", {}),  # the images a vision-language row is about
    )
