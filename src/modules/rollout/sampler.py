"""The sampler: a rollout backend run for one policy over a batch of prompts, as every caller needs it.

It seeds the sampling for the step (so a resumed run replays an uninterrupted one, and every rank draws its own
stream), puts the policy in eval mode for the rollout (no dropout) and back, and decodes the responses to text
for grading. Objectives pick the policy (``sampler(scorer.student, batch)``, the teacher for off-policy SFT) or
take the data set's reference solutions (``sampler.reference(batch)``).
"""

from __future__ import annotations

from typing import Callable

import torch

from src.modules.rollout.backend import RolloutBackend
from src.modules.rollout.batch import Rollout, reference_rollout


def _call(policy, fn, *args, **kwargs):
    return fn(policy, *args, **kwargs)


class Sampler:
    """
    Args:
        backend: the ``RolloutBackend``.
        tokenizer: the student's tokenizer (pad and EOS ids; decoding responses).
        eos_token_ids: the ids that end a response.
        banned_ids: ids never sampled (a vision-language model's image placeholders), or None.
        seed_of: ``(eval_batch) -> seed`` of the current step and rank (``eval_batch``: an evaluation batch's own
            stream, None in training).
        run: ``(policy, fn, *args, **kwargs) -> fn(policy, *args, **kwargs)`` as the policy's owner must call it:
            ``Scorer.run``, which runs it as a forward of the policy's ``ScoredModel`` (under FSDP2, with the
            sharded weights gathered for the rollout). Default: a plain call.
    """

    def __init__(self, backend: RolloutBackend, tokenizer, eos_token_ids: list[int],
                 banned_ids: torch.Tensor | None, seed_of: Callable[[int | None], int], run: Callable | None = None):
        self.backend, self.tokenizer = backend, tokenizer
        self.eos_token_ids, self.banned_ids, self.seed_of = list(eos_token_ids), banned_ids, seed_of
        self.run = run or _call

    def __call__(self, policy, batch: dict, greedy: bool = False, eval_batch: int | None = None,
                 **backend_kwargs) -> Rollout:
        """A rollout of ``batch`` by ``policy``; ``backend_kwargs`` (``num_samples``, ``max_new_tokens``) go to the
        backend."""
        was_training = policy.training
        policy.eval()
        device = batch["input_ids"].device
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(self.seed_of(eval_batch))
                ro = self.run(policy, self.backend, batch["input_ids"], batch["attention_mask"], self.eos_token_ids,
                              self.tokenizer.pad_token_id, greedy=greedy, banned_ids=self.banned_ids,
                              **backend_kwargs, **batch.get("model_kwargs", {}))
        except RuntimeError as e:  # torch.multinomial's message names no model, no step and no cause
            if "probability tensor contains either" not in str(e):
                raise
            from src.modules.guards import NonFiniteError

            largest = max((float(p.detach().abs().max()) for p in policy.parameters() if p.numel()), default=0.0)
            raise NonFiniteError(f"sampling from the policy: its next-token probabilities hold NaN or inf (its largest "
                                 f"weight is {largest:.3g}): its weights or activations have blown up. Lower "
                                 f"module.optimizer.lr or set module.grad_clip; check the model's dtype") from e
        finally:
            policy.train(was_training)
        ro.references = [r for r in batch["references"] for _ in range(ro.group_size)]
        ro.response_texts = self.decode(ro)
        if "teacher_input_ids" in batch:  # the teacher's own prompt, one per sample
            ro.teacher_prompt_ids = batch["teacher_input_ids"].repeat_interleave(ro.group_size, dim=0)
            ro.teacher_prompt_mask = batch["teacher_attention_mask"].repeat_interleave(ro.group_size, dim=0)
        return ro

    def reference(self, batch: dict) -> Rollout:
        """The batch's reference solutions as a rollout (no sampling, no rollout-time log-probs)."""
        if "target_ids" not in batch:
            raise ValueError("this objective trains on reference solutions, but the data rows have no 'solution'")
        return reference_rollout(batch, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id)

    def decode(self, ro: Rollout) -> list[str]:
        """The sampled response tokens of each row as text (special tokens dropped)."""
        ids_BT = torch.where(ro.response_mask_BT, ro.response_ids_BT, self.tokenizer.pad_token_id)
        return self.tokenizer.batch_decode(ids_BT, skip_special_tokens=True)
