"""Model specs: how the student and the teacher are loaded, and the preflight that compares them.

A spec is cheap to build (composing a config loads nothing); ``load_model()`` and ``load_tokenizer()``
do the heavy work, called from the LightningModule's ``configure_model``.

- ``PretrainedLM(path=...)``: a Hugging Face hub id or a local directory (``from_pretrained``).
- ``TinyQwen2(...)``: a Qwen2 of the given size with random weights and the project's character
  tokenizer, written once to a cache directory keyed by its config and then loaded through exactly
  the ``PretrainedLM`` path a real checkpoint takes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def _dtype(name: str, key: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"{key}.dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


class PretrainedLM:
    """A causal LM from a hub id or a local directory.

    Args:
        path: hub id (``Qwen/Qwen2.5-1.5B-Instruct``) or local directory with ``config.json``.
        dtype: weights dtype (``float32``, ``bfloat16``, ``float16``).
        tokenizer: tokenizer location if not ``path``.
        key: the config key of this spec, named in error messages.
        freeze: parameter-name prefixes kept fixed in training (e.g. ``[model.visual]``: a vision-language
            model's vision tower and merger, as LLaVA- and Qwen-VL-style fine-tunes often do).
        kwargs: passed to ``from_pretrained`` (``attn_implementation``, ``revision``, ...).
    """

    def __init__(self, path: str, dtype: str = "float32", tokenizer: str | None = None, key: str = "model",
                 trust_remote_code: bool = False, freeze: list[str] | None = None, **kwargs):
        if not path:
            raise ValueError(f"{key}.path is empty: give a hub id or a local model directory")
        self.path, self.key = str(path), key
        self.dtype = _dtype(dtype, key)
        self.tokenizer_path = str(tokenizer) if tokenizer else None
        self.trust_remote_code = trust_remote_code
        self.freeze = [str(f) for f in (freeze or [])]
        self.kwargs = kwargs

    def _resolve(self, path: str, what: str) -> str:
        looks_local = path.startswith((".", "/", "~")) or os.sep in path.strip("/").split("/", 1)[-1] \
            or Path(path).expanduser().exists()
        if looks_local and not Path(path).expanduser().exists():
            raise FileNotFoundError(f"{self.key}: {what} path {path!r} does not exist")
        return str(Path(path).expanduser()) if looks_local else path

    def load_model(self):
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

        path = self._resolve(self.path, "model")
        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=self.trust_remote_code)
            auto = AutoModelForImageTextToText if getattr(config, "vision_config", None) else AutoModelForCausalLM
            model = auto.from_pretrained(path, dtype=self.dtype, trust_remote_code=self.trust_remote_code,
                                         **self.kwargs)
        except OSError as e:
            raise OSError(f"{self.key}: could not load model {path!r} ({e}). Offline? Set {self.key}.path to a "
                          "local directory.") from e
        return self._frozen(model)

    def _frozen(self, model):
        """``model`` with the parameters under ``freeze`` set to ``requires_grad=False`` (the optimiser skips them)."""
        for prefix in self.freeze:
            params = [p for name, p in model.named_parameters() if name == prefix or name.startswith(prefix + ".")]
            if not params:
                roots = sorted({name.split(".")[0] + "." + name.split(".")[1] for name, _ in model.named_parameters()
                                if name.count(".") >= 1})
                raise ValueError(f"{self.key}.freeze: no parameter of {self.path!r} is under {prefix!r} "
                                 f"(top-level modules: {roots[:12]})")
            for p in params:
                p.requires_grad_(False)
        return model

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        path = self._resolve(self.tokenizer_path or self.path, "tokenizer" if self.tokenizer_path else "model")
        try:
            tok = AutoTokenizer.from_pretrained(path, trust_remote_code=self.trust_remote_code)
        except OSError as e:
            raise OSError(f"{self.key}: could not load tokenizer {path!r} ({e})") from e
        if not round_trips(tok) and (Path(path) / "tokenizer.json").exists():
            # transformers 5 maps a qwen2 config.json to Qwen2Tokenizer whatever tokenizer_config.json says,
            # and that class re-imposes Qwen's byte-level pre-tokenizer: a character vocabulary then loses
            # every space and newline. tokenizer.json itself is faithful.
            from transformers import PreTrainedTokenizerFast

            fast = PreTrainedTokenizerFast.from_pretrained(path)
            if round_trips(fast):
                tok = fast
        tok.padding_side = "left"  # prompts are left-padded so every response starts in the same column
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        return tok

    def is_multimodal(self) -> bool:
        """Whether the model takes images (its config has a ``vision_config``)."""
        from transformers import AutoConfig

        path = self._resolve(self.path, "model")
        config = AutoConfig.from_pretrained(path, trust_remote_code=self.trust_remote_code)
        return getattr(config, "vision_config", None) is not None

    def load_processor(self):
        """What prompts are encoded with: a vision-language model's processor (images and text, with the
        faithful tokenizer of ``load_tokenizer`` inside), else the tokenizer itself."""
        tok = self.load_tokenizer()
        if not self.is_multimodal():
            return tok
        from transformers import AutoProcessor

        path = self._resolve(self.tokenizer_path or self.path, "model")
        try:
            proc = AutoProcessor.from_pretrained(path, trust_remote_code=self.trust_remote_code)
        except OSError as e:
            raise OSError(f"{self.key}: could not load the processor of {path!r} ({e})") from e
        proc.tokenizer = tok
        return proc

    def __repr__(self) -> str:
        return f"{type(self).__name__}(path={self.path!r}, dtype={self.dtype})"


class BuiltOnFirstUse(PretrainedLM):
    """A ``PretrainedLM`` whose folder the project writes itself: ``build()`` runs before each load."""

    def build(self) -> str:
        raise NotImplementedError

    def load_model(self):
        self.build()
        return super().load_model()

    def load_tokenizer(self):
        self.build()
        return super().load_tokenizer()

    def load_processor(self):
        self.build()
        return super().load_processor()


class TinyQwen2(BuiltOnFirstUse):
    """A tiny random-weight Qwen2 with the character tokenizer, cached on disk by config.

    Args:
        cache_dir: where built models live; the folder name carries a hash of the config.
        hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size: architecture.
        seed: weight initialisation seed.
        max_position_embeddings: context length.
        chat_template: the tokenizer's chat template: a name in ``tokenizer.CHAT_TEMPLATES`` (``chatml``,
            ``tools``: ChatML that announces ``tools=``) or a Jinja template.
    """

    def __init__(self, cache_dir: str, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                 num_kv_heads: int = 2, intermediate_size: int | None = None, seed: int = 0,
                 max_position_embeddings: int = 1024, chat_template: str = "chatml", dtype: str = "float32",
                 key: str = "model", **kwargs):
        self.arch = dict(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                         num_key_value_heads=num_kv_heads,
                         intermediate_size=intermediate_size or int(hidden_size * 2.6875),
                         max_position_embeddings=max_position_embeddings, seed=seed)
        from src.modules.tokenizer import CHAT_TEMPLATES, CHATML_TEMPLATE, TOKENIZER_VERSION

        if chat_template not in CHAT_TEMPLATES and "{%" not in chat_template:
            raise ValueError(f"{key}.chat_template must be one of {sorted(CHAT_TEMPLATES)} or a Jinja template, "
                             f"got {chat_template!r}")
        self.chat_template = CHAT_TEMPLATES.get(chat_template, chat_template)
        spec = {**self.arch, "tok": TOKENIZER_VERSION}
        if self.chat_template != CHATML_TEMPLATE:  # the default keeps the folders built before the option
            spec["template"] = self.chat_template
        digest = hashlib.sha1(json.dumps(spec, sort_keys=True).encode())
        path = Path(cache_dir).expanduser() / f"tiny-qwen2-h{hidden_size}-l{num_layers}-{digest.hexdigest()[:10]}"
        super().__init__(str(path), dtype=dtype, key=key, **kwargs)

    def build(self) -> str:
        """Write the model and tokenizer to ``self.path`` unless already there (atomic for DDP ranks)."""
        path = Path(self.path)
        if (path / "config.json").exists():
            return str(path)
        from transformers import Qwen2Config, Qwen2ForCausalLM

        from src.modules.tokenizer import build_char_tokenizer

        tok = build_char_tokenizer()
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
        return _save_atomically(path, model, tok)


def _save_atomically(path: Path, *objects) -> str:
    """``save_pretrained`` every object into ``path`` via a temporary folder (DDP ranks may race)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".build-"))
    for obj in objects:
        obj.save_pretrained(tmp)
    try:
        os.rename(tmp, path)
    except OSError:  # another rank finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return str(path)


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
        from src.datamodules.vision import VL_PROCESSOR_VERSION
        from src.modules.tokenizer import TOKENIZER_VERSION

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

        from src.datamodules.vision import build_tiny_vl_processor

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
        return _save_atomically(path, model, proc)


PROBE = "Step 1: 12 + 34 = 46.\n  Answer:\t#### 46"


def round_trips(tokenizer, text: str = PROBE) -> bool:
    """Whether ``decode(encode(text)) == text``: spaces, newlines and digits survive the tokenizer."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids, clean_up_tokenization_spaces=False) == text


def padded_vocab_size(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


def render_template(tokenizer) -> str | None:
    if not getattr(tokenizer, "chat_template", None):
        return None
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def preflight(student, student_tok, teacher, teacher_tok, student_key="model.student",
              teacher_key="model.teacher") -> None:
    """Stop before step 0 unless teacher and student agree on what a token means.

    Compares the padded output vocabulary, the tokenizer size, pad and EOS ids and the rendered chat
    template. Cross-tokenizer distillation is deliberately not supported yet.
    """
    checks = [
        ("padded vocabulary size (output embedding rows)", padded_vocab_size(student), padded_vocab_size(teacher)),
        ("tokenizer vocabulary size", len(student_tok), len(teacher_tok)),
        ("pad token id", student_tok.pad_token_id, teacher_tok.pad_token_id),
        ("eos token id", student_tok.eos_token_id, teacher_tok.eos_token_id),
        ("rendered chat template", render_template(student_tok), render_template(teacher_tok)),
    ]
    for key, tok in ((student_key, student_tok), (teacher_key, teacher_tok)):
        if not round_trips(tok):
            raise ValueError(f"preflight: {key}'s tokenizer ({type(tok).__name__}) does not round-trip "
                             f"{PROBE!r}: it would drop or alter characters of every prompt and response")
    for what, s, t in checks:
        if s != t:
            raise ValueError(f"preflight: student and teacher disagree on {what}: {student_key} has {s!r}, "
                             f"{teacher_key} has {t!r}. Use models of one family and tokenizer.")
