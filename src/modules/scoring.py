"""Scoring sampled tokens: log-probs and predictive entropy, chunked along the sequence.

Scoring a rollout is two steps: a *backbone* turns the sequences into the final hidden states that predict the
response tokens, and the chunked *head* turns those into log-probs and entropies. The backbone is the seam where
accelerations plug in (``Backbone``; the default runs the Hugging Face model's own forward, ``hf_backbone``; the
``accel`` config group can choose another). ``Scorer`` bundles what an objective scores with: the student, the
teacher, the sampling temperature, the chunk size and the backbone.

Scoring is one module call: ``ScoredModel`` wraps a model so that its forward *is* backbone-then-head. A sharding
strategy (FSDP2, ``src/modules/sharding.py``) makes that wrapper its root shard, so the head's weights are
gathered for the forward and their gradients reduced after the backward as for any module's; nothing reads
``lm_head.weight`` from outside a forward. The rollout of a policy runs through the same wrapper
(``ScoredModel.run``), with the weights gathered for it.

For a causal LM with final hidden states ``h`` [B, T, H] and output head ``W`` [V, H]::

    z      = (h @ W.T) / temperature                  # logits at temperature, [B, T, V]
    logp_t = z[y_t] - logsumexp(z)                    # sampled token y_t
    H_t    = logsumexp(z) - sum softmax(z) * z        # full-vocabulary entropy

A full fp32 ``[B, T, V]`` tensor is never held: at 152k-token vocabularies it is ~20 GB for 8 x 4k
tokens. The head is applied ``chunk_size`` positions at a time by ``_ChunkLogpEntropy``, whose backward
recomputes the chunk's logits once and turns them in place into the gradient, so no chunk's logits are
kept between forward and backward (``benchmarks/memory.py`` measures it).
Only the response positions are projected (the prompt's logits are never needed).

"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Protocol

import torch
import torch.nn.functional as F

from src.modules.models.multimodal import is_multimodal, model_inputs

BANNED_LOGIT = -1e30  # finite, so a banned token's p * z is 0 rather than nan in the entropy


def _logits(h_NH, weight_VH, bias_V, inv_temp: float, banned_K):
    """Logits at temperature, banned ids set to ``BANNED_LOGIT``; written in place (one ``[N, V]`` buffer), which
    autograd allows: the matmul's backward needs its inputs, not its output."""
    z_NV = F.linear(h_NH, weight_VH, bias_V).float().mul_(inv_temp)
    if banned_K is not None:  # tokens the policy may never sample: renormalise over the rest
        z_NV.index_fill_(-1, banned_K.to(z_NV.device), BANNED_LOGIT)
    return z_NV


class _ChunkLogpEntropy(torch.autograd.Function):
    """Log-prob of the target and entropy for one chunk of positions, with a hand-written backward.

    Saves only the inputs and ``logsumexp`` (an ``[N]`` vector), never the ``[N, V]`` logits. The backward
    rebuilds the logits once and turns them, in place, into ``d logp / d z = (onehot - softmax) / T``:
    at a 152k vocabulary that holds one ``[N, V]`` buffer where ``torch.utils.checkpoint`` of the same
    computation held about five (the rerun forward, the softmax, and autograd's own gradient temporaries).
    """

    @staticmethod
    def forward(ctx, h_NH, weight_VH, bias_V, target_N, inv_temp: float, with_entropy: bool, banned_K):
        z_NV = _logits(h_NH, weight_VH, bias_V, inv_temp, banned_K)
        lse_N = torch.logsumexp(z_NV, dim=-1)
        logp_N = z_NV.gather(-1, target_N[:, None]).squeeze(-1) - lse_N
        entropy_N = None
        if with_entropy:  # H = lse - sum p z, the product taken in place: no third [N, V] buffer
            entropy_N = lse_N - torch.softmax(z_NV, dim=-1).mul_(z_NV).sum(-1)
            ctx.mark_non_differentiable(entropy_N)
        ctx.save_for_backward(h_NH, weight_VH, bias_V, target_N, lse_N, banned_K)
        ctx.inv_temp = inv_temp
        return logp_N, entropy_N

    @staticmethod
    def backward(ctx, g_N, _g_entropy):
        h_NH, weight_VH, bias_V, target_N, lse_N, banned_K = ctx.saved_tensors
        g_N = g_N.float() * ctx.inv_temp
        gz_NV = _logits(h_NH.detach(), weight_VH.detach(), None if bias_V is None else bias_V.detach(),
                        ctx.inv_temp, banned_K)
        gz_NV.sub_(lse_N[:, None]).exp_()  # softmax, in place
        gz_NV.mul_(-g_N[:, None]).scatter_add_(1, target_N[:, None], g_N[:, None])
        gz_NV = gz_NV.to(h_NH.dtype)
        gh = gz_NV @ weight_VH if ctx.needs_input_grad[0] else None
        gw = gz_NV.T @ h_NH if ctx.needs_input_grad[1] else None
        gb = gz_NV.sum(0) if bias_V is not None and ctx.needs_input_grad[2] else None
        return gh, gw, gb, None, None, None, None


def _head_rows(head: torch.nn.Module, vocab_size: int | None):
    """The head's weight and bias, cut to its first ``vocab_size`` rows (None: all)."""
    if vocab_size is None:
        return head.weight, head.bias
    return head.weight[:vocab_size], None if head.bias is None else head.bias[:vocab_size]


def token_logp_entropy(
    hidden_BTH: torch.Tensor,
    head: torch.nn.Linear,
    target_BT: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = True,
    banned_ids: torch.Tensor | None = None,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of ``target_BT`` and entropy at each position, from hidden states aligned with targets.

    ``hidden_BTH[:, t]`` must be the state that predicts ``target_BT[:, t]``. ``chunk_size`` counts
    tokens (B * positions) per head application. ``banned_ids`` are left out of the distribution (the
    rollout never samples them: a vision-language model's image placeholder tokens). ``vocab_size``: only the
    head's first rows count (the shared tokenizer's ids, where a pair's heads differ in padding rows). Returns
    (logp_BT float32, entropy_BT float32 or None); the entropy carries no gradient.
    """
    B, T, H = hidden_BTH.shape
    h_NH = hidden_BTH.reshape(B * T, H)
    target_N = target_BT.reshape(B * T)
    inv_temp = 1.0 / float(temperature)
    chunk_size = max(1, int(chunk_size))
    if banned_ids is not None:
        banned_ids = banned_ids.to(h_NH.device)
    weight_VH, bias_V = _head_rows(head, vocab_size)
    logps, ents = [], []
    for s in range(0, B * T, chunk_size):
        lp, ent = _ChunkLogpEntropy.apply(h_NH[s : s + chunk_size], weight_VH, bias_V,
                                          target_N[s : s + chunk_size], inv_temp, with_entropy, banned_ids)
        logps.append(lp)
        ents.append(ent)
    logp_BT = torch.cat(logps).view(B, T)
    entropy_BT = torch.cat(ents).view(B, T) if with_entropy else None
    return logp_BT, entropy_BT


def reference_logp_entropy(logits_BTV: torch.Tensor, target_BT: torch.Tensor, temperature: float = 1.0):
    """Unchunked reference of ``token_logp_entropy`` from full logits (tests and debugging only)."""
    logp_BTV = torch.log_softmax(logits_BTV.float() / temperature, dim=-1)
    logp_BT = logp_BTV.gather(-1, target_BT[..., None]).squeeze(-1)
    entropy_BT = -(logp_BTV.exp() * logp_BTV).sum(-1)
    return logp_BT, entropy_BT


def position_ids_from_mask(attention_mask_BT: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as ``generate`` assigns them."""
    return (attention_mask_BT.long().cumsum(-1) - 1).clamp(min=0)


class Backbone(Protocol):
    """Final hidden states [B, T - response_start, H] (after the model's final norm) that predict the response
    tokens ``input_ids_BT[:, response_start:]``: ``hidden_BTH[:, t]`` predicts ``input_ids_BT[:, response_start + t]``.
    ``model_kwargs`` carry a vision-language batch's images. With gradient where gradient is on."""

    def __call__(self, model, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor, response_start: int,
                 **model_kwargs) -> torch.Tensor: ...


def hf_backbone(model, input_ids_BT, attention_mask_BT, response_start: int, **model_kwargs) -> torch.Tensor:
    """``Backbone`` through the Hugging Face model's own backbone (no head, so no logits are formed here).

    Vision-language models get their images through ``model_kwargs`` (``pixel_values``, ``image_grid_thw``): the
    teacher scores the student's tokens conditioned on the very pixels the student saw.
    """
    if is_multimodal(model):
        # the text decoder alone would drop pixel_values silently; the multimodal backbone (no head) merges
        # the image features and computes its own 3-D rotary positions
        backbone = model.model
        model_kwargs = model_inputs(model_kwargs, seq_len=input_ids_BT.shape[1])
        image_id = getattr(model.config, "image_token_id", None)
        if image_id is not None and "pixel_values" not in model_kwargs and (input_ids_BT == image_id).any():
            # without pixels the placeholders would pass as ordinary text embeddings, silently
            raise ValueError("the sequences hold image placeholder tokens but no pixel_values came with them: "
                             "pass the batch's model_kwargs through to the scorer")
    else:
        backbone = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
        model_kwargs = dict(model_kwargs)
        model_kwargs.setdefault("position_ids", position_ids_from_mask(attention_mask_BT))
    out = backbone(input_ids=input_ids_BT, attention_mask=attention_mask_BT, use_cache=False, **model_kwargs)
    return out.last_hidden_state[:, response_start - 1 : -1]


def score_tokens(
    model,
    input_ids_BT: torch.Tensor,
    attention_mask_BT: torch.Tensor,
    response_start: int,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = True,
    banned_ids: torch.Tensor | None = None,
    backbone: Backbone = hf_backbone,
    vocab_size: int | None = None,
    **model_kwargs,
):
    """Log-probs (and entropies) of the response tokens under ``model`` at ``temperature``: ``backbone``, then the
    chunked head. Returns tensors of shape [B, T_resp] with ``T_resp = input_ids_BT.shape[1] - response_start``.
    """
    hidden_BTH = backbone(model, input_ids_BT, attention_mask_BT, response_start, **model_kwargs)
    return token_logp_entropy(
        hidden_BTH, model.get_output_embeddings(), input_ids_BT[:, response_start:],
        temperature=temperature, chunk_size=chunk_size, with_entropy=with_entropy, banned_ids=banned_ids,
        vocab_size=vocab_size,
    )


class ScoredModel(torch.nn.Module):
    """``model``'s scoring as its forward: ``backbone`` and the chunked head in one call (see the module docstring).

    ``run(fn, *args)`` calls ``fn(model, *args)`` as another forward of this module (a rollout: the sampler runs
    the backend through it), inside ``around_run`` (a context a sharding plan sets: weights kept gathered for the
    whole rollout instead of gathered and freed per decoded token)."""

    def __init__(self, model: torch.nn.Module, backbone: Backbone = hf_backbone):
        super().__init__()
        self.model, self.backbone = model, backbone
        self.around_run = contextlib.nullcontext

    def forward(self, input_ids_BT, attention_mask_BT, response_start: int, temperature: float = 1.0,
                chunk_size: int = 1024, with_entropy: bool = True, banned_ids: torch.Tensor | None = None,
                vocab_size: int | None = None, **model_kwargs):
        logp_BT, entropy_BT = score_tokens(self.model, input_ids_BT, attention_mask_BT, response_start, temperature,
                                           chunk_size, with_entropy, banned_ids, self.backbone, vocab_size,
                                           **model_kwargs)
        # not views ([B, T] copies are cheap): FSDP2 hooks a root's outputs, and an in-place op on a view of one
        # would slip past the hook
        return logp_BT.clone(), None if entropy_BT is None else entropy_BT.clone()

    def run(self, fn, *args, **kwargs):
        with self.around_run():
            return fn(self.model, *args, **kwargs)


@dataclasses.dataclass
class Scorer:
    """What an objective scores a rollout with (``ro``: a ``src.modules.rollout.batch.Rollout``).

    The teacher runs under ``torch.no_grad``; the student with gradient where gradient is on. Both are scored at
    the rollout's sampling temperature (peers that forget this score the teacher at T=1 against a T=0.6 rollout)
    unless a call says otherwise. ``banned_ids`` (a vision-language model's image placeholders) are left out of
    every distribution, as the rollout never samples them. ``vocab_size`` (from the preflight, where the pair's
    output heads differ in padding rows): both are scored over the shared tokenizer's ids only.
    """

    student: torch.nn.Module
    teacher: torch.nn.Module | None
    temperature: float
    chunk_size: int = 1024
    backbone: Backbone = hf_backbone
    banned_ids: torch.Tensor | None = None
    micro_batch_tokens: int | None = None  # the teacher scores a rollout this many padded tokens at a time
    vocab_size: int | None = None
    cross_vocab: object | None = None  # a teacher with its own tokenizer (``cross_vocab.CrossVocabTeacher``)
    _scored: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

    def scored(self, model) -> ScoredModel:
        """The ``ScoredModel`` of the student or the teacher (one each, made on first use; a sharding plan shards it
        in ``DistillationModule.configure_model``)."""
        if model not in self._scored:
            self._scored[model] = ScoredModel(model, self.backbone)
        return self._scored[model]

    def run(self, model, fn, *args, **kwargs):
        """``fn(model, *args, **kwargs)`` as a forward of ``model``'s ``ScoredModel`` (a rollout, weights gathered)."""
        return self.scored(model).run(fn, *args, **kwargs)

    def logp(self, model, ro, with_entropy: bool = False, temperature: float | None = None):
        """(logp_BT, entropy_BT or None) of ``ro``'s response tokens under ``model``."""
        return self.scored(model)(ro.input_ids, ro.attention_mask, ro.response_start, temperature or self.temperature,
                                  self.chunk_size, with_entropy, self.banned_ids, self.vocab_size, **ro.model_kwargs)

    def student_logp(self, ro, with_entropy: bool = False, temperature: float | None = None):
        """The student's (logp_BT, entropy_BT or None), with gradient where gradient is on."""
        return self.logp(self.student, ro, with_entropy, temperature)

    def teacher_logp(self, ro) -> torch.Tensor:
        """The teacher's logp_BT of the sampled tokens (0 outside the response mask), without gradient. The teacher
        reads its own prompt where the rollout carries one (``Rollout.teacher_view``); a cross-vocabulary teacher
        scores the response text and credits its log-probs to the student's tokens (``cross_vocab``)."""
        if self.cross_vocab is not None:
            return self.cross_vocab.teacher_logp(self, ro)
        return self.score_teacher(ro.teacher_view()) * ro.response_mask_BT

    def score_teacher(self, ro) -> torch.Tensor:
        """The teacher's logp_BT of ``ro``'s response tokens, without gradient and in eval mode (a self-distillation
        teacher may be the training student itself), ``micro_batch_tokens`` padded tokens at a time."""
        parts, was_training = [], self.teacher.training
        self.teacher.eval()
        try:
            with torch.no_grad():
                for part in ro.micro_batches(self.micro_batch_tokens):
                    logp_BT, _ = self.logp(self.teacher, part)  # a filler too: every rank joins every forward's gathers
                    if not part.filler:
                        parts.append(logp_BT)
        finally:
            self.teacher.train(was_training)
        return torch.cat(parts)

    def hidden(self, model, ro) -> tuple[torch.Tensor, torch.nn.Module]:
        """``model``'s final hidden states over the response (``Backbone``) and its output head, for objectives that
        need the full distributions (GKD)."""
        h = self.backbone(model, ro.input_ids, ro.attention_mask, ro.response_start, **ro.model_kwargs)
        return h, model.get_output_embeddings()

    def vocab_logp(self, hidden_NH: torch.Tensor, head: torch.nn.Module) -> torch.Tensor:
        """Full-vocabulary log-probs ``[N, V]`` (fp32) of hidden states under ``head`` at the sampling temperature,
        over the same distribution as ``logp`` (banned ids renormalised away). Holds ``[N, V]``: call it on chunks."""
        return torch.log_softmax(_logits(hidden_NH, *_head_rows(head, self.vocab_size), 1.0 / self.temperature,
                                         self.banned_ids),
                                 dim=-1)
