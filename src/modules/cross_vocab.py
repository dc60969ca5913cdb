"""Cross-vocabulary distillation: a teacher with its own tokenizer scores the student's response *text*.

The same-vocabulary reward is ``R_t = log pi_t(y_t) - log pi_s(y_t)`` per sampled token (``method/rewards.py``).
When the two tokenizers differ, a student token has no teacher counterpart, but a stretch of text does:

1. The teacher sees the prompt rendered with *its* chat template and the response text tokenised by *its*
   tokenizer (``teacher_response_logps``), one forward over prompt + response.
2. Each tokenisation of the response maps to character ranges ``[start, end)`` that tile the text
   (``token_char_spans``). A token's range is the characters it *completes*: byte-level BPE splits one multi-byte
   character over several tokens, and only the last of them gets the character; the others get an empty range.
3. ``align`` cuts the text at the boundaries the two tilings share. Between two consecutive shared boundaries lies
   a *span*: a group of consecutive student tokens and a group of consecutive teacher tokens that cover exactly
   the same characters. These spans are minimal (no shared boundary inside). A token with an empty range joins
   the span that starts at its position (the character it helps spell), or the last span at the end of the text.
4. A span's log-ratio is the log-probability of its text under each model, given the prompt and the preceding
   response text (chain rule over the span's tokens)::

       R_span = sum_{u in span} log pi_t(z_u) - sum_{t in span} log pi_s(y_t)

   and ``span_rewards`` assigns it to the span's student tokens: ``rule="last"`` (default) puts all of it on the
   span's last student token, ``rule="spread"`` gives each of its ``k`` student tokens ``R_span / k``. Either way
   the rewards of a span sum to ``R_span``, so the response's total reward is the sequence log-ratio
   ``log pi_t(text) - log pi_s(text)`` (up to the tokenisation each model assigns the text).

With identical tokenisations every span is one token on each side and the reward is the same-vocabulary one,
bit for bit. Preconditions, not checked here: both tokenizers round-trip the response text
(``decode(encode(text)) == text``, see ``models.specs.round_trips``), or the models score a text other than the
response; and the student's log-probs are those of the ids ``token_char_spans`` sees (its tokenisation of the
text), which may differ from the ids it sampled where sampling left a non-canonical tokenisation.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Literal

import torch

from src.modules.scoring import ScoredModel

CharRange = tuple[int, int]
RULES = ("last", "spread")


def token_char_spans(tokenizer, text: str) -> list[CharRange]:
    """The ``[start, end)`` characters of ``text`` that each token of ``tokenizer(text, add_special_tokens=False)``
    completes: monotone, contiguous, from 0 to ``len(text)`` (``tokenised``, the ranges alone).
    """
    return tokenised(tokenizer, text)[1]


def tokenised(tokenizer, text: str) -> tuple[list[int], list[CharRange]]:
    """``tokenizer``'s ids of ``text`` (``add_special_tokens=False``) and the characters each completes, from one
    tokenisation.

    From the fast tokenizer's offsets, normalised: a token ends where the next tokens no longer touch its characters
    (``min(end_i, start_j for j > i)``), so the byte-level pieces of one character before its last get an empty range
    at the current position; characters no token claims (offsets trimmed of whitespace) go to the next token, and
    any after the last token's end to the last token. Special-token text (``"<|im_end|>"``) is one token, as the
    tokenizer splits it.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("token_char_spans needs a fast (Rust) tokenizer for its offsets, got "
                        f"{type(tokenizer).__name__}")
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoded["input_ids"]), encoded["offset_mapping"]
    if not offsets:
        if text:
            raise ValueError(f"the tokenizer gives no tokens for a text of {len(text)} characters: {text[:40]!r}")
        return ids, []
    ends, later_start = [0] * len(offsets), len(text)
    for i in range(len(offsets) - 1, -1, -1):  # a character a later token still touches is not complete yet
        start, end = offsets[i]
        ends[i] = min(end, later_start)
        later_start = min(later_start, start)
    ends[-1] = len(text)
    ranges, pos = [], 0
    for end in ends:
        end = min(max(end, pos), len(text))
        ranges.append((pos, end))
        pos = end
    return ids, ranges


def _check_tiling(ranges: Sequence[CharRange], side: str) -> int:
    """The text length that ``ranges`` tile; raises unless they are contiguous from 0."""
    pos = 0
    for i, (start, end) in enumerate(ranges):
        if start != pos or end < start:
            raise ValueError(f"{side} token {i} covers [{start}, {end}), expected to start at {pos}: "
                             "ranges must tile the text (use token_char_spans)")
        pos = end
    return pos


def _span_of(ranges: Sequence[CharRange], cuts: list[int]) -> list[int]:
    """Index of the span each token falls in, given the spans' end positions ``cuts``."""
    last = len(cuts) - 1
    return [bisect.bisect_left(cuts, end) if end > start else min(bisect.bisect_right(cuts, start), last)
            for start, end in ranges]


def align(student_ranges: Sequence[CharRange], teacher_ranges: Sequence[CharRange]) -> list[tuple[range, range]]:
    """The minimal spans (student token indices, teacher token indices) that cover the same characters.

    Both tilings must cover the same text (``token_char_spans`` of it). A span closes at every character position
    where a student token and a teacher token both end; empty-range tokens join the span starting at their
    position (the last span at the end of the text). Spans are consecutive and every token is in exactly one.
    """
    length = _check_tiling(student_ranges, "student")
    if _check_tiling(teacher_ranges, "teacher") != length:
        raise ValueError(f"the student's tokens cover {length} characters, the teacher's "
                         f"{teacher_ranges[-1][1] if teacher_ranges else 0}: they must tile the same text")
    if length == 0:  # no characters: at most one span of empty tokens
        return [(range(len(student_ranges)), range(len(teacher_ranges)))] if student_ranges or teacher_ranges else []
    ends = [{end for start, end in ranges if end > start} for ranges in (student_ranges, teacher_ranges)]
    cuts = sorted(ends[0] & ends[1])
    student_span, teacher_span = _span_of(student_ranges, cuts), _span_of(teacher_ranges, cuts)
    s_bounds, t_bounds = _bounds(student_span, len(cuts)), _bounds(teacher_span, len(cuts))
    return [(range(*s), range(*t)) for s, t in zip(s_bounds, t_bounds)]


def _bounds(span_of_token: list[int], n_spans: int) -> list[tuple[int, int]]:
    """``[first, last + 1)`` token indices of each span, from the (non-decreasing) span index of each token."""
    first, bounds = 0, []
    for k in range(n_spans):
        stop = bisect.bisect_right(span_of_token, k, lo=first)
        bounds.append((first, stop))
        first = stop
    return bounds


@torch.no_grad()
def teacher_response_logps(teacher: torch.nn.Module, teacher_tokenizer, prompt_messages: list[dict],
                           response_text: str, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's token ids of ``response_text`` and their log-probs, ``(ids_T long, logp_T float32)``.

    The prompt is rendered with the teacher's chat template (``add_generation_prompt=True``) and the response
    tokenised on its own (``add_special_tokens=False``), so the ids are those ``token_char_spans(teacher_tokenizer,
    response_text)`` describes; one forward over prompt + response scores them at ``temperature``. ``teacher`` is a
    causal LM or its ``ScoredModel`` (the one a sharding plan wrapped). Both tensors are on the teacher's device.
    """
    scored = teacher if isinstance(teacher, ScoredModel) else ScoredModel(teacher)
    device = next(scored.parameters()).device
    prompt = teacher_tokenizer.apply_chat_template(prompt_messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = teacher_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = teacher_tokenizer(response_text, add_special_tokens=False)["input_ids"]
    ids_T = torch.tensor(ids, dtype=torch.long, device=device)
    if not ids:
        return ids_T, torch.zeros(0, dtype=torch.float32, device=device)
    if not prompt_ids:
        raise ValueError("the teacher's chat template rendered an empty prompt: nothing predicts the first token")
    input_ids_BT = torch.tensor([prompt_ids + ids], dtype=torch.long, device=device)
    logp_BT, _ = scored(input_ids_BT, torch.ones_like(input_ids_BT), len(prompt_ids), temperature,
                        with_entropy=False)
    return ids_T, logp_BT[0].float()


def span_rewards(student_logp_T: torch.Tensor, teacher_logp_T: torch.Tensor, spans: Sequence[tuple[range, range]],
                 rule: Literal["last", "spread"] = "last") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-student-token rewards from the spans' log-ratios, and the mask of tokens that carry one.

    Args:
        student_logp_T: the student's log-prob of each of its response tokens, [T_s].
        teacher_logp_T: the teacher's log-prob of each of *its* response tokens, [T_t] (``teacher_response_logps``).
        spans: ``align``'s (student indices, teacher indices) groups, covering both sides.
        rule: ``"last"``: the span's whole log-ratio on its last student token, 0 on the others; ``"spread"``:
            ``R_span / k`` on each of its ``k`` student tokens.
    Returns:
        ``(reward_T float32 [T_s], carries_T bool [T_s])``, no gradient. A span's rewards sum to its log-ratio under
        either rule. ``carries_T`` marks the tokens a reward was assigned to (the spans' last tokens under "last",
        every token of a span with student tokens under "spread"). What acts per token afterwards acts on these:
        the clip ``max(R, c)`` is applied to carrying tokens only (a 0 placeholder is not a log-ratio and must
        not be raised to a positive floor), and the exploration mask (``R >= c``) and the entropy quantile select
        among ``valid & carries_T``, so a non-carrying token neither passes a reward test nor counts in the
        quantile. Under "last" the clip and the exploration floor judge a whole span's log-ratio, as the
        same-vocabulary method judges one token's; under "spread" they judge a share, i.e. a span of ``k``
        tokens is floored at ``k * c``.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    student = student_logp_T.detach().float()
    teacher = teacher_logp_T.detach().float().to(student.device)
    n_student, n_teacher = sum(len(s) for s, _ in spans), sum(len(t) for _, t in spans)
    if (n_student, n_teacher) != (student.numel(), teacher.numel()):
        raise ValueError(f"the spans cover {n_student} student and {n_teacher} teacher tokens, the log-probs "
                         f"{student.numel()} and {teacher.numel()}")
    device = student.device
    span_of_student = torch.tensor([k for k, (s, _) in enumerate(spans) for _ in s], dtype=torch.long, device=device)
    span_of_teacher = torch.tensor([k for k, (_, t) in enumerate(spans) for _ in t], dtype=torch.long, device=device)
    # a one-token span's sum is its log-prob exactly (0 + x), so one-token spans give t - s bit for bit
    span_ratio = (torch.zeros(len(spans), device=device).index_add_(0, span_of_teacher, teacher)
                  - torch.zeros(len(spans), device=device).index_add_(0, span_of_student, student))
    reward_T = torch.zeros_like(student)
    carries_T = torch.zeros(student.shape, dtype=torch.bool, device=device)
    if rule == "last":
        with_student = torch.tensor([len(s) > 0 for s, _ in spans], dtype=torch.bool, device=device)
        last = torch.tensor([s[-1] for s, _ in spans if len(s)], dtype=torch.long, device=device)
        reward_T[last] = span_ratio[with_student]
        carries_T[last] = True
    else:
        count = torch.tensor([max(len(s), 1) for s, _ in spans], dtype=torch.float32, device=device)
        reward_T = (span_ratio / count)[span_of_student]
        carries_T[:] = True
    return reward_T, carries_T


def sampled_char_spans(tokenizer, ids: Sequence[int], text: str) -> list[CharRange]:
    """The ``[start, end)`` characters of ``text`` that each of the *sampled* ``ids`` completes, where ``text`` is
    their decoding. A policy may sample a tokenisation the tokenizer would not produce (``"4" "6"`` where it writes
    ``"46"``); its tokens are then placed by decoding growing prefixes (a piece ending inside a multi-byte character
    decodes to ``U+FFFD`` and completes nothing yet). The canonical case goes through ``token_char_spans``."""
    ids = [int(i) for i in ids]
    if tokenizer(text, add_special_tokens=False)["input_ids"] == ids:
        return token_char_spans(tokenizer, text)
    ranges, pos = [], 0
    for i in range(len(ids)):
        piece = tokenizer.decode(ids[: i + 1], skip_special_tokens=False).rstrip("\ufffd")
        if not text.startswith(piece):
            raise ValueError(f"the sampled tokens do not decode to a prefix of their text at token {i}: "
                             f"{piece[-40:]!r} is not the start of {text[:len(piece) + 10][-50:]!r}")
        end = max(pos, len(piece))
        ranges.append((pos, end))
        pos = end
    if ranges:
        ranges[-1] = (ranges[-1][0], len(text))
    return ranges


def credited_teacher_logp(student_logp_T: torch.Tensor, teacher_logp_T: torch.Tensor,
                          spans: Sequence[tuple[range, range]], rule: Literal["last", "spread"] = "last"
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's log-probability credited to each student token, and the mask of tokens that carry a reward.

    ``credited - student_logp_T`` is ``span_rewards``' reward under ``rule``, so the same-vocabulary reward
    ``log pi_t - log pi_s`` (``method/rewards.py``) applies to it unchanged: a span's credits sum to the teacher's
    log-probability of its text. Under ``"last"`` the tokens before a span's last carry their own log-prob (reward
    0) and only the last carries the rest; under ``"spread"`` each of ``k`` tokens gets its log-prob plus
    ``R_span / k``. Where a span is one token on each side the credit is the teacher's log-prob itself, bit for bit,
    so identical tokenisations give the same-vocabulary reward exactly.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    student = student_logp_T.detach().float()
    teacher = teacher_logp_T.detach().float().to(student.device)
    _, carries_T = span_rewards(student, teacher, spans, rule)  # checks the spans against both sides
    device = student.device
    span_of_student = torch.tensor([k for k, (s, _) in enumerate(spans) for _ in s], dtype=torch.long, device=device)
    span_of_teacher = torch.tensor([k for k, (_, t) in enumerate(spans) for _ in t], dtype=torch.long, device=device)
    span_t = torch.zeros(len(spans), device=device).index_add_(0, span_of_teacher, teacher)[span_of_student]
    span_s = torch.zeros(len(spans), device=device).index_add_(0, span_of_student, student)[span_of_student]
    # the span's teacher log-prob less the student's on the span's other tokens: T exactly on a one-token span
    rest = span_t - (span_s - student)
    if rule == "last":
        return torch.where(carries_T, rest, student), carries_T
    k = torch.tensor([len(s) for s, _ in spans for _ in s], dtype=torch.float32, device=device)
    return torch.where(k == 1, rest, student + (span_t - span_s) / k), carries_T


class CrossVocabTeacher:
    """A teacher with its own tokenizer, scoring the student's responses as text (module docstring).

    ``teacher_logp(scorer, ro)`` is ``Scorer.teacher_logp`` for such a teacher: per row, the sampled response (its
    EOS aside) is decoded to text, placed on characters (``sampled_char_spans``), tokenised by the teacher and
    aligned; a response that ended with the student's EOS gets the teacher's EOS as the last teacher token, aligned
    with it (the end of the turn is scored too; a truncated response has none). The teacher reads its own prompt
    (``Rollout.teacher_prompt_ids``, rendered with its chat template by the datamodule) and the rows are scored as
    one padded batch, micro-batched like any teacher scoring. Returns ``credited_teacher_logp`` per student token
    and sets ``ro.scored_mask_BT`` to the tokens that carry a reward.

    A row whose sampled tokens are not the student tokenizer's own tokenisation of their text carries no reward
    (``canonical_only``, the default; ``ro.metrics["noncanonical_frac"]`` counts them). The token-level log-ratio
    ``log pi_t(text) - log pi_s(tokens)`` would pay the student for writing the same text in more, less likely
    pieces: each split lowers ``log pi_s`` of the pieces, not the teacher's score of the text. On the miniature that
    collapsed a BPE student (seed 1: 55% to 20% test accuracy, responses from 18 to 27 tokens for text of the same
    length, the pieces' errors compounding); with such rows out of the loss it does not arise.

    Limits: text responses only (a vision-language batch or a tool episode, whose tool replies sit inside the
    response, is refused); the student's special tokens other than its EOS are decoded as their text.
    """

    def __init__(self, student_tokenizer, teacher_tokenizer, student_eos_ids: Sequence[int], rule: str = "last",
                 canonical_only: bool = True):
        if rule not in RULES:
            raise ValueError(f"model.teacher.cross_vocab_rule must be one of {RULES}, got {rule!r}")
        for side, tok in (("student", student_tokenizer), ("teacher", teacher_tokenizer)):
            if not getattr(tok, "is_fast", False):
                raise TypeError(f"cross-vocabulary distillation needs fast (Rust) tokenizers for character offsets; "
                                f"the {side}'s is {type(tok).__name__}")
        if teacher_tokenizer.eos_token_id is None or teacher_tokenizer.pad_token_id is None:
            raise ValueError("cross-vocabulary distillation: the teacher's tokenizer needs an EOS and a pad token")
        self.student_tok, self.teacher_tok, self.rule = student_tokenizer, teacher_tokenizer, rule
        self.canonical_only = canonical_only
        self.student_eos = {int(i) for i in student_eos_ids}
        self.teacher_eos = int(teacher_tokenizer.eos_token_id)

    def align_row(self, ids: Sequence[int]) -> tuple[list[int], list[tuple[range, range]], bool]:
        """The teacher's ids of one sampled response, the spans aligning them with the sampled ids, and whether the
        sampled ids are the student tokenizer's own tokenisation of their text."""
        ids = [int(i) for i in ids]
        ended = bool(ids) and ids[-1] in self.student_eos
        body = ids[:-1] if ended else ids
        text = self.student_tok.decode(body, skip_special_tokens=False)
        canonical_ids, student_ranges = tokenised(self.student_tok, text)  # one tokenisation a side
        canonical = canonical_ids == body
        teacher_ids, teacher_ranges = tokenised(self.teacher_tok, text)
        if not canonical:  # the sampled tokens, placed by their own decoding
            student_ranges = sampled_char_spans(self.student_tok, body, text)
        spans = align(student_ranges, teacher_ranges)
        if ended:
            spans.append((range(len(body), len(body) + 1), range(len(teacher_ids), len(teacher_ids) + 1)))
            teacher_ids = teacher_ids + [self.teacher_eos]
        return teacher_ids, spans, canonical

    def teacher_logp(self, scorer, ro) -> torch.Tensor:
        from src.modules.rollout.batch import Rollout

        if ro.model_kwargs or ro.tool_counts_BK is not None:
            raise ValueError("cross-vocabulary distillation scores text responses only (not vision-language batches "
                             "or tool episodes)")
        if ro.teacher_prompt_ids is None:
            raise ValueError("cross-vocabulary distillation: the batch carries no teacher prompts (the datamodule "
                             "renders them once it has the teacher's tokenizer: set_teacher_tokenizer)")
        device = ro.input_ids.device
        lengths = ro.response_mask_BT.sum(-1).tolist()
        rows = [self.align_row(ro.response_ids_BT[b, :n].tolist()) for b, n in enumerate(lengths)]
        T_t = max([len(t) for t, _, _ in rows] + [1])
        resp_BT = torch.full((len(rows), T_t), self.teacher_tok.pad_token_id, dtype=torch.long, device=device)
        mask_BT = torch.zeros((len(rows), T_t), dtype=torch.bool, device=device)
        for b, (t_ids, _, _) in enumerate(rows):
            resp_BT[b, : len(t_ids)] = torch.tensor(t_ids, dtype=torch.long, device=device)
            mask_BT[b, : len(t_ids)] = True
        prompt_BP = ro.teacher_prompt_ids.to(device)
        prompt_mask_BP = ro.teacher_prompt_mask.to(device, ro.attention_mask.dtype)
        limit = getattr(getattr(scorer.teacher, "config", None), "max_position_embeddings", None)
        longest = max(int(prompt_mask_BP[b].sum()) + len(t_ids) for b, (t_ids, _, _) in enumerate(rows))
        if limit and longest > limit:  # the teacher's tokenisation may be longer than the student's budget
            raise ValueError(f"cross-vocabulary scoring: a response in the teacher's tokens reaches {longest} "
                             f"positions with its prompt, past the teacher's max_position_embeddings ({limit}): "
                             "lower rollout.max_new_tokens")
        teacher_ro = Rollout(input_ids=torch.cat([prompt_BP, resp_BT], dim=1),
                             attention_mask=torch.cat([prompt_mask_BP, mask_BT.to(prompt_mask_BP.dtype)], dim=1),
                             response_start=prompt_BP.shape[1], response_mask_BT=mask_BT, old_logp_BT=None,
                             entropy_BT=None, truncated_B=ro.truncated_B)
        t_logp_BT = scorer.score_teacher(teacher_ro)
        credited_BT = torch.zeros_like(ro.old_logp_BT, dtype=torch.float32)
        carries_BT = torch.zeros_like(ro.response_mask_BT)
        for b, ((t_ids, spans, canonical), n) in enumerate(zip(rows, lengths)):
            credit, carries = credited_teacher_logp(ro.old_logp_BT[b, :n], t_logp_BT[b, : len(t_ids)], spans,
                                                    self.rule)
            credited_BT[b, :n] = credit
            carries_BT[b, :n] = carries if canonical or not self.canonical_only else False
        noncanonical = sum(not canonical for _, _, canonical in rows)
        ro.metrics["noncanonical_frac"] = torch.tensor(noncanonical / max(1, len(rows)))
        ro.scored_mask_BT = carries_BT
        return credited_BT * ro.response_mask_BT
