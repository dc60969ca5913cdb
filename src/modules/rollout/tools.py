"""Multi-turn tool-use rollouts: the policy writes a turn, the environment answers its tool calls, repeat.

One episode is ``prompt, a_1, e_1, a_2, e_2, ..., a_K`` where ``a_k`` are assistant turns the policy
sampled (each up to and including its EOS) and ``e_k`` is the chat template's text around the tool
messages that answer ``a_k`` (``\\n<|im_start|>user\\n<tool_response>\\n...</tool_response><|im_end|>\\n
<|im_start|>assistant\\n`` for Qwen). The result is an ordinary ``Rollout``: the response columns hold the
whole episode; ``response_mask_BT`` is 1 on the ``a_k`` only, so rewards, losses and lengths count the
policy's own tokens, while ``attention_mask`` is 1 on the environment's tokens too, so the student and the
teacher score every sampled token in the full multi-turn context (after the tool output it saw).

Decisions (deviations from a single ``generate``):
- Token in, token out: sampled tokens are kept as sampled, never re-tokenised from text; only the
  environment glue is tokenised. With a BPE tokenizer the ids can differ from tokenising the rendered
  conversation at the glue's far end (``assistant\\n`` followed by the policy's first token); the glue's
  near end follows a special token (EOS), where tokenisation is split anyway.
- The glue is ``src.tools.episodes.tool_glue``: the template's text after the assistant's closing EOS, rendered
  from a minimal conversation (``tests/test_tool_rollout.py`` checks an episode token by token against the full
  rendered conversation).
- Every sequence advances one turn per batched ``generate``; finished ones wait. Each turn re-encodes the
  whole context (no KV cache across turns).
- ``max_new_tokens`` is the episode's budget of *sampled* tokens (glue is free). A turn is generated with
  ``min(turn budget, largest remaining episode budget among active sequences)`` and each sequence's turn is
  then cut to its own remaining budget: a cut prefix of a sample is a sample of the shorter budget, so
  every sequence gets exactly its budget.
- A sequence finishes when a turn has no tool call (a final answer), when a turn ends without EOS (turn or
  episode budget hit mid-turn), at ``max_turns``, or when its budget is spent. ``truncated_B`` means "no
  final answer": the last turn had no EOS, or it still asked for a tool (at ``max_turns`` or without budget).
- The environment decides what a call is: a turn is answered by ``environment.execute(text)`` (text decoded
  without the EOS, special tokens kept); an empty reply means the turn was final. ``ToolEnvironment`` replies
  exactly when ``has_tool_call(text)``.
- Text only: images with tools are not combined yet (``NotImplementedError``).
- Reference episodes for SFT (``src.tools.episodes.render_episode``) go through the same glue: a demonstration's
  tokens and sampled mask are those of the episode the rollout produces when the policy writes the same turns.
- Validation pools the episode statistics over batches (``episode_totals``, ``TOOL_STATS``): tool calls per
  episode, malformed calls per call, failed calls per call, turns per episode.
- ``seconds`` is the wall time of the whole episode loop, tool execution included.
"""

from __future__ import annotations

import time

import torch

from src.modules.models.multimodal import has_images
from src.modules.rollout.backend import RolloutBackend
from src.modules.rollout.batch import Rollout
from src.modules.rollout.hf import HFGenerateRollout
from src.tools.calls import has_tool_call, parse_tool_calls
from src.tools.episodes import glue_ids

# what a tool rollout counts per episode (the columns of ``Rollout.tool_counts_BK``), and its statistics:
# (metric, numerator total, denominator total) over ``episode_totals``
TOOL_COUNTS = ("calls", "malformed", "errors", "turns")
TOOL_STATS = (("tools/calls_per_episode", "calls", "episodes"), ("tools/malformed_rate", "malformed", "calls"),
              ("tools/error_rate", "errors", "calls"), ("turns_mean", "turns", "episodes"))


def episode_totals(ro) -> dict[str, float] | None:
    """Totals over a tool rollout's episodes (``episodes`` and ``TOOL_COUNTS``), so that evaluations over
    several batches can pool them; None for a rollout without tool statistics."""
    if ro.tool_counts_BK is None:
        return None
    sums = ro.tool_counts_BK.sum(0).tolist()
    return {"episodes": float(ro.tool_counts_BK.shape[0]), **dict(zip(TOOL_COUNTS, sums))}


def tool_stats(totals: dict[str, float]) -> dict[str, float]:
    """``TOOL_STATS`` of ``episode_totals`` (a ratio over an empty denominator is 0)."""
    return {name: totals[num] / max(totals[den], 1) for name, num, den in TOOL_STATS}


class _Episode:
    """One sequence's response so far: token ids, which were sampled, and their rollout-time stats."""

    def __init__(self, prompt: list[int]):
        self.prompt, self.ids, self.sampled_mask, self.logp, self.entropy = prompt, [], [], [], []
        self.sampled = self.turns = self.calls = self.malformed = self.errors = 0
        self.truncated = False

    def add(self, ids: list[int], sampled: bool, logp: list[float] | None = None,
            entropy: list[float] | None = None):
        self.ids += ids
        self.sampled_mask += [sampled] * len(ids)
        self.logp += logp if logp is not None else [0.0] * len(ids)
        self.entropy += entropy if entropy is not None else [0.0] * len(ids)
        self.sampled += len(ids) if sampled else 0


def _left_pad(rows: list[list[int]], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), L), dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        ids[i, L - len(r):] = torch.tensor(r, dtype=torch.long, device=device)
        mask[i, L - len(r):] = 1
    return ids, mask


class ToolRollout(RolloutBackend):
    """A rollout backend whose episodes call tools between turns.

    Args:
        environment: answers a turn: ``execute(text) -> [{"role": "tool", "name", "content"}]`` (``[]``: the
            turn is final) and ``schemas()`` for the chat template (``src.tools.ToolEnvironment``).
        tokenizer: decodes turns and encodes the environment's replies; or given later by ``bind``.
        max_turns: assistant turns per episode at most.
        max_new_tokens: budget of sampled tokens per episode, all turns together.
        turn_max_new_tokens: budget per turn (default: the episode's).
        temperature, top_p, top_k, num_samples, val_max_new_tokens, backend, decoder, kv_cache_gb: as
            ``HFGenerateRollout``,
            which samples each turn (``val_max_new_tokens``: the greedy episode budget).
    """

    def __init__(self, environment, tokenizer=None, max_turns: int = 4, max_new_tokens: int = 256,
                 turn_max_new_tokens: int | None = None, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = 0, num_samples: int = 1, val_max_new_tokens: int | None = None,
                 backend: str = "loop", decoder=None, kv_cache_gb: float | None = None):
        super().__init__(max_new_tokens, temperature, top_p, top_k, num_samples, val_max_new_tokens)
        if max_turns < 1:
            raise ValueError(f"rollout.max_turns must be >= 1, got {max_turns}")
        if turn_max_new_tokens is not None and turn_max_new_tokens < 1:
            raise ValueError(f"rollout.turn_max_new_tokens must be >= 1 or null, got {turn_max_new_tokens}")
        self.turn = HFGenerateRollout(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                      top_k=top_k, num_samples=num_samples,
                                      val_max_new_tokens=val_max_new_tokens, backend=backend, decoder=decoder,
                                      kv_cache_gb=kv_cache_gb)
        self.environment, self.tokenizer = environment, tokenizer
        self.max_turns, self.turn_max_new_tokens = max_turns, turn_max_new_tokens

    def bind(self, tokenizer, scorer=None, compute_dtype=None) -> None:
        """Turns are decoded, and the environment's replies encoded, with the student's tokenizer."""
        self.tokenizer = tokenizer
        self.turn.bind(tokenizer, scorer, compute_dtype)

    def _glue_ids(self, text: str, messages: list[dict], eos_texts: list[str]) -> list[int]:
        return glue_ids(self.tokenizer, text, messages, eos_texts, self.environment.schemas())

    @torch.no_grad()
    def __call__(self, model, prompt_ids_BP, prompt_mask_BP, eos_token_ids, pad_token_id,
                 num_samples: int | None = None, greedy: bool = False, max_new_tokens: int | None = None,
                 banned_ids: torch.Tensor | None = None, **model_kwargs) -> Rollout:
        if self.tokenizer is None:
            raise RuntimeError("ToolRollout needs a tokenizer: pass tokenizer= or call bind(tokenizer, ...)")
        if has_images(model_kwargs):
            raise NotImplementedError("ToolRollout does not combine images with tool calls yet")
        budget = self.budget(greedy, max_new_tokens)
        turn_budget = min(self.turn_max_new_tokens or budget, budget)
        G, prompt_ids_BP, prompt_mask_BP, model_kwargs = self.group(greedy, num_samples, prompt_ids_BP,
                                                                    prompt_mask_BP, model_kwargs)
        eos_token_ids = list(eos_token_ids)
        eos_texts = [self.tokenizer.decode([i]) for i in eos_token_ids]
        B, device = prompt_ids_BP.shape[0], prompt_ids_BP.device
        episodes = [_Episode(prompt_ids_BP[b][prompt_mask_BP[b].bool()].tolist()) for b in range(B)]
        start = time.perf_counter()
        active = list(range(B))
        while active:
            contexts = [episodes[b].prompt + episodes[b].ids for b in active]
            ids, mask = _left_pad(contexts, pad_token_id, device)
            rows = torch.tensor(active, device=device)
            kwargs = {k: v[rows] if isinstance(v, torch.Tensor) and v.shape[:1] == (B,) else v
                      for k, v in model_kwargs.items()}
            remaining = [budget - episodes[b].sampled for b in active]
            ro = self.turn(model, ids, mask, eos_token_ids, pad_token_id, num_samples=1, greedy=greedy,
                           max_new_tokens=min(turn_budget, max(remaining)), banned_ids=banned_ids, **kwargs)
            n_sampled = ro.response_mask_BT.sum(-1).tolist()
            still = []
            for j, b in enumerate(active):
                ep = episodes[b]
                n = min(n_sampled[j], remaining[j])  # cut to this sequence's own remaining budget
                tokens = ro.response_ids_BT[j, :n].tolist()
                stats = ([] if ro.old_logp_BT is None else
                         [ro.old_logp_BT[j, :n].tolist(), ro.entropy_BT[j, :n].tolist()])
                ep.add(tokens, True, *stats)
                ep.turns += 1
                if not tokens or tokens[-1] not in eos_token_ids:
                    ep.truncated = True  # cut mid-turn: no EOS, so no template to continue from
                    continue
                text = self.tokenizer.decode(tokens[:-1], skip_special_tokens=False)
                if ep.turns >= self.max_turns or ep.sampled >= budget:
                    ep.truncated = has_tool_call(text)  # a call left unanswered is no final answer
                    continue
                messages = self.environment.execute(text)
                if not messages:
                    continue  # a final answer
                ep.calls += len(messages)
                ep.malformed += sum(getattr(c, "kind", None) == "malformed" for c in parse_tool_calls(text))
                ep.errors += sum(str(m["content"]).startswith("error:") for m in messages)
                ep.add(self._glue_ids(text, messages, eos_texts), False)
                still.append(b)
            active = still
        seconds = time.perf_counter() - start
        return self._assemble(episodes, prompt_ids_BP, prompt_mask_BP, pad_token_id, greedy, G, seconds,
                              model_kwargs)

    @staticmethod
    def _assemble(episodes, prompt_ids_BP, prompt_mask_BP, pad_token_id, greedy, G, seconds, model_kwargs):
        B, device = len(episodes), prompt_ids_BP.device
        T = max(len(ep.ids) for ep in episodes)
        response_BT = torch.full((B, T), pad_token_id, dtype=prompt_ids_BP.dtype, device=device)
        real_BT = torch.zeros((B, T), dtype=torch.bool, device=device)
        sampled_BT = torch.zeros((B, T), dtype=torch.bool, device=device)
        logp_BT = torch.zeros((B, T), dtype=torch.float32, device=device)
        entropy_BT = torch.zeros((B, T), dtype=torch.float32, device=device)
        for b, ep in enumerate(episodes):
            n = len(ep.ids)
            response_BT[b, :n] = torch.tensor(ep.ids, dtype=prompt_ids_BP.dtype, device=device)
            real_BT[b, :n] = True
            sampled_BT[b, :n] = torch.tensor(ep.sampled_mask, dtype=torch.bool, device=device)
            logp_BT[b, :n] = torch.tensor(ep.logp, device=device)
            entropy_BT[b, :n] = torch.tensor(ep.entropy, device=device)
        counts_BK = torch.tensor([[getattr(ep, k) for k in TOOL_COUNTS] for ep in episodes], dtype=torch.float64)
        totals = {"episodes": float(B), **dict(zip(TOOL_COUNTS, counts_BK.sum(0).tolist()))}
        metrics = {name: torch.tensor(v) for name, v in tool_stats(totals).items()}
        return Rollout(
            input_ids=torch.cat([prompt_ids_BP, response_BT], dim=1),
            # environment tokens are attended (the policy read them) but were not sampled
            attention_mask=torch.cat([prompt_mask_BP, real_BT.to(prompt_mask_BP.dtype)], dim=1),
            response_start=prompt_ids_BP.shape[1], response_mask_BT=sampled_BT,
            old_logp_BT=None if greedy else logp_BT, entropy_BT=None if greedy else entropy_BT,
            truncated_B=torch.tensor([ep.truncated for ep in episodes], dtype=torch.bool, device=device),
            group_size=G, seconds=seconds, model_kwargs=model_kwargs, metrics=metrics,
            tool_counts_BK=counts_BK,
        )
