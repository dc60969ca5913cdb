"""Tiny random-weight models the project builds itself, written once to a cache folder keyed by their config and
loaded through the ``PretrainedLM`` path a real checkpoint takes.

- ``TinyQwen2``: a Qwen2 with the project's character tokenizer.
- ``TinyQwen2VL``: a Qwen2.5-VL (vision tower + Qwen2 decoder) with the character tokenizer plus Qwen's vision
  tokens, and a Qwen2-VL image processor (``build_tiny_vl_processor``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from src.modules.models.specs import BuiltOnFirstUse, save_atomically
from src.modules.models.tokenizer import (
    CHAT_TEMPLATES,
    CHATML_TEMPLATE,
    TOKENIZER_VERSION,
    build_bpe_tokenizer,
    build_char_tokenizer,
)


class TinyQwen2(BuiltOnFirstUse):
    """A tiny random-weight Qwen2 with the character tokenizer, cached on disk by config.

    Args:
        cache_dir: where built models live; the folder name carries a hash of the config.
        hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size: architecture.
        seed: weight initialisation seed.
        max_position_embeddings: context length.
        chat_template: the tokenizer's chat template: a name in ``tokenizer.CHAT_TEMPLATES`` (``chatml``,
            ``tools``: ChatML that announces ``tools=``) or a Jinja template.
        tokenizer: ``char`` (one token per character) or ``bpe`` (merges learned from the arithmetic miniature:
            another vocabulary for the same text, ``tokenizer.build_bpe_tokenizer``; a cross-vocabulary student).
    """

    def __init__(self, cache_dir: str, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                 num_kv_heads: int = 2, intermediate_size: int | None = None, seed: int = 0,
                 max_position_embeddings: int = 1024, chat_template: str = "chatml", dtype: str = "float32",
                 key: str = "model", tokenizer: str = "char", **kwargs):
        if tokenizer not in ("char", "bpe"):
            raise ValueError(f"{key}.tokenizer must be 'char' or 'bpe', got {tokenizer!r}")
        self.tokenizer_kind = tokenizer
        self.arch = dict(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                         num_key_value_heads=num_kv_heads,
                         intermediate_size=intermediate_size or int(hidden_size * 2.6875),
                         max_position_embeddings=max_position_embeddings, seed=seed)
        if chat_template not in CHAT_TEMPLATES and "{%" not in chat_template:
            raise ValueError(f"{key}.chat_template must be one of {sorted(CHAT_TEMPLATES)} or a Jinja template, "
                             f"got {chat_template!r}")
        self.chat_template = CHAT_TEMPLATES.get(chat_template, chat_template)
        spec = {**self.arch, "tok": TOKENIZER_VERSION}
        if self.chat_template != CHATML_TEMPLATE:  # the default keeps the folders built before the option
            spec["template"] = self.chat_template
        if tokenizer != "char":  # likewise
            spec["tokenizer"] = tokenizer
        digest = hashlib.sha1(json.dumps(spec, sort_keys=True).encode())
        path = Path(cache_dir).expanduser() / f"tiny-qwen2-h{hidden_size}-l{num_layers}-{digest.hexdigest()[:10]}"
        super().__init__(str(path), dtype=dtype, key=key, **kwargs)

    def build(self) -> str:
        """Write the model and tokenizer to ``self.path`` unless already there (atomic for DDP ranks)."""
        path = Path(self.path)
        if (path / "config.json").exists():
            return str(path)
        from transformers import Qwen2Config, Qwen2ForCausalLM

        tok = build_bpe_tokenizer() if self.tokenizer_kind == "bpe" else build_char_tokenizer()
        tok.chat_template = self.chat_template
        arch = dict(self.arch)
        seed = arch.pop("seed")
        cfg = Qwen2Config(vocab_size=len(tok), tie_word_embeddings=True, bos_token_id=None,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, use_cache=True, **arch)
        gen = torch.random.fork_rng(devices=[])
        with gen:
            torch.manual_seed(seed)
            model = Qwen2ForCausalLM(cfg)
        model.generation_config.bos_token_id = None
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
        return save_atomically(path, model, tok)


class TinyQwen2VL(BuiltOnFirstUse):
    """A tiny random-weight Qwen2.5-VL (vision tower + Qwen2 decoder) with the character tokenizer plus
    Qwen's vision tokens and a Qwen2-VL image processor, cached on disk by config; loaded through the
    ``PretrainedLM`` path a real ``Qwen/Qwen2.5-VL-*`` checkpoint takes.

    Args:
        hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size: the text decoder.
        vision_depth, vision_hidden_size: the vision tower (patch 14, spatial merge 2 as in Qwen2.5-VL).
        min_pixels, max_pixels: the image processor's resize bounds (few patches keep the CPU fast).
        mrope_section: how the decoder's ``head_size / 2`` rotary frequencies split between the time, height
            and width positions, highest frequencies first (default ``[h/2 - 2 (h//6), h//6, h//6]`` for head
            size h: ``[4, 2, 2]`` at 16; Qwen2.5-VL's own is ``[16, 24, 24]`` at 128). Inside one image every
            token shares the time position, and either split leaves width the slowest frequencies: at
            ``rope_theta`` 1e6 and head size 16, neighbouring columns differ by about 3e-5 rad, so the decoder
            cannot tell them apart (the image is a bag of cells to it, unless the vision tower encodes
            position). ``[0, 0, head_size / 2]`` gives width every frequency, as text positions have (rows
            then share positions: for one-row images).
        rope_theta: the decoder's RoPE base (default: Qwen2.5-VL's 1e6).
    """

    def __init__(self, cache_dir: str, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                 num_kv_heads: int = 2, intermediate_size: int | None = None, vision_depth: int = 1,
                 vision_hidden_size: int = 32, min_pixels: int = 56 * 56, max_pixels: int = 112 * 112,
                 seed: int = 0, max_position_embeddings: int = 2048, mrope_section: list[int] | None = None,
                 rope_theta: float | None = None, dtype: str = "float32", key: str = "model", **kwargs):
        if hidden_size % num_heads or (hidden_size // num_heads) % 2:
            raise ValueError(f"{key}.hidden_size / num_heads must be an even head size, got {hidden_size}/{num_heads}")
        head = hidden_size // num_heads
        if mrope_section is not None:
            mrope_section = [int(x) for x in mrope_section]
            if len(mrope_section) != 3 or min(mrope_section) < 0 or sum(mrope_section) != head // 2:
                raise ValueError(f"{key}.mrope_section must be 3 non-negative counts (time, height, width) summing "
                                 f"to head_size / 2 = {head // 2}, got {mrope_section}")
        if rope_theta is not None and rope_theta <= 0:
            raise ValueError(f"{key}.rope_theta must be positive, got {rope_theta}")
        self.rope = {k: v for k, v in (("mrope_section", mrope_section), ("rope_theta", rope_theta)) if v is not None}
        self.arch = dict(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                         num_key_value_heads=num_kv_heads,
                         intermediate_size=intermediate_size or int(hidden_size * 2.6875),
                         max_position_embeddings=max_position_embeddings)
        self.vision = dict(depth=vision_depth, hidden_size=vision_hidden_size, intermediate_size=2 * vision_hidden_size,
                           num_heads=2, out_hidden_size=hidden_size, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=56, fullatt_block_indexes=[0])
        self.pixels, self.seed = dict(min_pixels=min_pixels, max_pixels=max_pixels), seed
        spec = {**self.arch, **{f"vision_{k}": v for k, v in self.vision.items()}, **self.pixels, "seed": seed,
                "tok": TOKENIZER_VERSION, "proc": VL_PROCESSOR_VERSION, **self.rope}  # defaults keep old folders
        digest = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
        path = Path(cache_dir).expanduser() / f"tiny-qwen2.5-vl-h{hidden_size}-l{num_layers}-{digest}"
        super().__init__(str(path), dtype=dtype, key=key, **kwargs)

    def build(self) -> str:
        path = Path(self.path)
        if (path / "config.json").exists():
            return str(path)
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        proc = build_tiny_vl_processor(**self.pixels)
        tok = proc.tokenizer
        head = self.arch["hidden_size"] // self.arch["num_attention_heads"]
        # multimodal RoPE: the head's rotary frequencies split between time, height and width (sum = head / 2)
        section = self.rope.get("mrope_section", [head // 2 - 2 * (head // 6), head // 6, head // 6])
        rope = {"type": "mrope", "mrope_section": section}
        theta = {"rope_theta": float(self.rope["rope_theta"])} if "rope_theta" in self.rope else {}
        ids = {name: tok.convert_tokens_to_ids(t) for name, t in (
            ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
        text = dict(vocab_size=len(tok), tie_word_embeddings=True, bos_token_id=None, eos_token_id=tok.eos_token_id,
                    pad_token_id=tok.pad_token_id, rope_scaling=rope, **theta,
                    **self.arch)
        cfg = Qwen2_5_VLConfig(text_config=text, vision_config=self.vision, bos_token_id=None,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                               tie_word_embeddings=True, **ids)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = Qwen2_5_VLForConditionalGeneration(cfg)
        gen = model.generation_config
        gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = None, tok.eos_token_id, tok.pad_token_id
        return save_atomically(path, model, proc)


VL_PROCESSOR_VERSION = 1  # for a tiny VL model's cache key: bump when the tokens or the template change
VL_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
VL_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' or 'image' in item %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_vl_processor(min_pixels: int = 56 * 56, max_pixels: int = 112 * 112, patch_size: int = 14,
                            merge_size: int = 2, temporal_patch_size: int = 2):
    """A ``Qwen2_5_VLProcessor`` built offline: the character tokenizer plus Qwen's vision tokens (appended,
    so the character ids are unchanged; ``len(processor.tokenizer)`` is the vocabulary a model needs) and a
    ChatML template that renders an image item as ``<|vision_start|><|image_pad|><|vision_end|>``.
    ``save_pretrained`` / ``AutoProcessor.from_pretrained`` round-trip it."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    tok = build_char_tokenizer()
    tok.add_tokens(VL_TOKENS, special_tokens=True)
    vision = dict(patch_size=patch_size, merge_size=merge_size, temporal_patch_size=temporal_patch_size)
    images = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels, **vision)
    videos = Qwen2VLVideoProcessor(**vision)  # unused, but the processor requires one
    return Qwen2_5_VLProcessor(image_processor=images, tokenizer=tok, video_processor=videos,
                               chat_template=VL_CHAT_TEMPLATE)
