"""What a rollout backend is: the contract every way of sampling (the lean decode loop, Hugging Face ``generate``,
multi-turn tool episodes, vLLM) fulfils, with the sampling settings it declares.

A backend is given a policy and left-padded prompts and returns a ``Rollout`` whose response columns hold what the
policy sampled, with the rollout-time log-probs and entropies of the sampled tokens at the sampling temperature
(what the loss takes as ``pi_old``; None when greedy). ``bind`` is called once the models are loaded, so that a
backend can keep what it needs (a tokenizer for tool replies; the student an engine mirrors, and the scorer that
gives its rollout-time log-probs).
"""

from __future__ import annotations

import abc

import torch

from src.modules.models.multimodal import has_images, repeat_vision_kwargs
from src.modules.rollout.batch import Rollout


def response_mask_from_ids(response_ids_BT: torch.Tensor, eos_token_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of sampled tokens up to and including the first EOS, and whether each row was truncated."""
    ids = [eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids)
    eos = torch.as_tensor(ids, device=response_ids_BT.device)
    is_eos_BT = torch.isin(response_ids_BT, eos)
    # number of EOS strictly before each position: 0 means the position is still part of the response
    eos_before_BT = is_eos_BT.long().cumsum(-1) - is_eos_BT.long()
    return eos_before_BT == 0, ~is_eos_BT.any(-1)


def check_sampling(temperature: float, top_p: float, top_k: int, num_samples: int) -> None:
    """A rollout backend's sampling settings, each named by its config key when out of range."""
    if temperature <= 0:
        raise ValueError(f"rollout.temperature must be > 0 (use greedy=True for argmax), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"rollout.top_p must lie in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"rollout.top_k must be >= 0 (0 disables it), got {top_k}")
    if num_samples < 1:
        raise ValueError(f"rollout.num_samples must be >= 1, got {num_samples}")


class RolloutBackend(abc.ABC):
    """Sampling settings (each checked and named by its config key) and the call every backend implements.

    Args:
        max_new_tokens: token budget per response.
        temperature, top_p, top_k: sampling; ``top_k=0`` disables top-k. Log-probs use ``temperature`` only (the
            untruncated distribution), the convention of vLLM and of the paper's reward.
        num_samples: G responses per prompt.
        val_max_new_tokens: budget for greedy validation decoding (defaults to ``max_new_tokens``).
    """

    shardable = True  # runs the policy only through its module calls (trainer=fsdp2 can shard it)

    def __init__(self, max_new_tokens: int = 256, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 num_samples: int = 1, val_max_new_tokens: int | None = None):
        check_sampling(temperature, top_p, top_k, num_samples)
        if max_new_tokens < 1:
            raise ValueError(f"rollout.max_new_tokens must be >= 1, got {max_new_tokens}")
        if val_max_new_tokens is not None and val_max_new_tokens < 1:
            raise ValueError(f"rollout.val_max_new_tokens must be >= 1 or null, got {val_max_new_tokens}")
        self.max_new_tokens = max_new_tokens
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.num_samples = num_samples
        self.val_max_new_tokens = max_new_tokens if val_max_new_tokens is None else val_max_new_tokens

    def bind(self, tokenizer, scorer, compute_dtype: torch.dtype | None) -> None:
        """Called once the models are loaded: the student's tokenizer, the ``src.modules.scoring.Scorer`` (the
        student, and how the loss scores it), and the dtype the student computes in under the trainer's precision
        (None: its weights' own). Backends that need none of it ignore it."""

    def budget(self, greedy: bool, max_new_tokens: int | None) -> int:
        """The token budget of a call: ``max_new_tokens`` if given, else the greedy or the sampling budget."""
        if max_new_tokens is None:
            return self.val_max_new_tokens if greedy else self.max_new_tokens
        if max_new_tokens < 1:
            raise ValueError(f"a rollout's max_new_tokens must be >= 1, got {max_new_tokens}")
        return max_new_tokens

    def group(self, greedy: bool, num_samples: int | None, prompt_ids_BP: torch.Tensor, prompt_mask_BP: torch.Tensor,
              model_kwargs: dict) -> tuple[int, torch.Tensor, torch.Tensor, dict]:
        """``G`` (1 when greedy, else ``num_samples`` or the configured number) and the prompts with their
        ``model_kwargs`` repeated so that rows ``[b*G:(b+1)*G]`` share prompt b (a vision-language batch's images
        follow their rows)."""
        G = 1 if greedy else (num_samples or self.num_samples)
        if G == 1:
            return G, prompt_ids_BP, prompt_mask_BP, model_kwargs
        if has_images(model_kwargs):  # pixel rows belong to images, not to sequences
            model_kwargs = repeat_vision_kwargs(model_kwargs, G)
        else:
            model_kwargs = {k: v.repeat_interleave(G, dim=0) if isinstance(v, torch.Tensor) else v
                            for k, v in model_kwargs.items()}
        return G, prompt_ids_BP.repeat_interleave(G, dim=0), prompt_mask_BP.repeat_interleave(G, dim=0), model_kwargs

    @abc.abstractmethod
    def __call__(self, model, prompt_ids_BP: torch.Tensor, prompt_mask_BP: torch.Tensor, eos_token_ids,
                 pad_token_id: int, num_samples: int | None = None, greedy: bool = False,
                 max_new_tokens: int | None = None, banned_ids: torch.Tensor | None = None,
                 **model_kwargs) -> Rollout:
        """``G`` responses per prompt (``num_samples``, default the configured one; 1 when ``greedy``: argmax
        decoding), each up to ``max_new_tokens`` (default: ``budget``). ``banned_ids`` are never sampled, and the
        recorded log-probs renormalise without them. ``model_kwargs`` travel with the prompts (a vision-language
        batch's images). Rows ``[b*G:(b+1)*G]`` of the result share prompt b."""
