"""Measures of how the student stands to the teacher, for diagnostics (``src/callbacks/diagnostics.py``, the
module's ``grad_cosine_every``): exact full-vocabulary KLs on given tokens, and how the method's gradient points
against the exact reverse KL's."""

from __future__ import annotations

import dataclasses

import torch

from src.modules.method.losses import generalized_jsd
from src.modules.method.objectives import GeneralizedJSD


@torch.no_grad()
def exact_kls(scorer, ro, chunk: int = 4096) -> tuple[float, float]:
    """Mean per-token reverse and forward KL between ``scorer``'s student and teacher over ``ro``'s response
    tokens, over the full vocabulary, ``chunk`` positions at a time."""
    hs, head_s = scorer.hidden(scorer.student, ro)
    ht, head_t = scorer.hidden(scorer.teacher, ro)
    mask = ro.response_mask_BT.reshape(-1).bool()
    hs, ht = hs.reshape(-1, hs.shape[-1])[mask], ht.reshape(-1, ht.shape[-1])[mask]
    reverse, forward = 0.0, 0.0
    for i in range(0, hs.shape[0], chunk):
        s, t = scorer.vocab_logp(hs[i:i + chunk], head_s), scorer.vocab_logp(ht[i:i + chunk], head_t)
        reverse += float(generalized_jsd(s, t, 1.0).sum())  # beta 1: KL(student || teacher)
        forward += float(generalized_jsd(s, t, 0.0).sum())  # beta 0: KL(teacher || student)
    n = max(int(mask.sum()), 1)
    return reverse / n, forward / n


def exact_reverse_kl_cosine(scorer, ro, params: list[torch.nn.Parameter]) -> float:
    """The cosine between the gradient the parameters hold now (the method's, from its sampled tokens) and the
    gradient of the exact per-token reverse KL(student || teacher) over the full vocabulary on the same rollout's
    response tokens (GKD at beta 1, token mean). 1: the method moves the student as exact reverse KL would. Under
    DDP the method's gradient is already the ranks' mean and the exact one this rank's batch's: a noisier cosine."""
    exact = dataclasses.replace(ro, loss_mask_BT=ro.response_mask_BT, batch_loss_mask_BT=None)
    loss, _ = GeneralizedJSD(beta=1.0).loss(exact, scorer)
    held = [(p, p.grad) for p in params if p.grad is not None]
    grads = torch.autograd.grad(loss, [p for p, _ in held], allow_unused=True)
    dot = sum(float((g.float() * e.float()).sum()) for (_, g), e in zip(held, grads) if e is not None)
    norm_method = sum(float(g.float().pow(2).sum()) for _, g in held) ** 0.5
    norm_exact = sum(float(e.float().pow(2).sum()) for e in grads if e is not None) ** 0.5
    return dot / (norm_method * norm_exact) if norm_method > 0 and norm_exact > 0 else float("nan")
