"""Model specs: how the student and the teacher are loaded.

A spec is cheap to build (composing a config loads nothing); ``load_model()`` and ``load_tokenizer()``
do the heavy work, called from the LightningModule's ``configure_model``.

- ``PretrainedLM(path=...)``: a Hugging Face hub id or a local directory (``from_pretrained``).
- ``BuiltOnFirstUse``: a ``PretrainedLM`` whose folder the project writes itself, then loads through exactly the
  path a real checkpoint takes (``tiny.py``: random-weight models; ``stages.py``: models trained by an earlier
  stage).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def trainer_compute_dtype(trainer_cfg) -> str:
    """The dtype a trainer config computes in: an FSDP2 plan's ``param_dtype``, else its ``precision``'s
    (``bf16-mixed``/``bf16-true``: bfloat16, ``16-mixed``/``16-true``: float16, ``32-true``: float32)."""
    strategy = trainer_cfg.get("strategy")
    plan = strategy.get("plan") if hasattr(strategy, "get") else None
    if plan is not None and plan.get("param_dtype"):
        return str(plan.get("param_dtype"))
    precision = str(trainer_cfg.get("precision") or "32-true")
    return "bfloat16" if precision.startswith("bf16") else "float16" if precision.startswith("16") else "float32"


def follow_trainer_dtype(cfg) -> None:
    """``model.teacher.dtype: null`` (the default of ``model=pretrained``): the teacher is loaded in the dtype the
    trainer computes in (``trainer_compute_dtype``), so an fp32 run scores with an fp32 teacher."""
    teacher = cfg.model.get("teacher")
    if teacher is None or "dtype" not in teacher or teacher.get("dtype") is not None:
        return
    teacher.dtype = trainer_compute_dtype(cfg.trainer)
    print(f"[config] model.teacher.dtype follows the trainer: {teacher.dtype} (trainer.precision="
          f"{cfg.trainer.get('precision')})")


def _dtype(name: str, key: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"{key}.dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


# a folder with none of these holds no tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model",
                   "vocab.txt")


class PretrainedLM:
    """A causal LM from a hub id or a local directory.

    Args:
        path: hub id (``Qwen/Qwen2.5-1.5B-Instruct``) or local directory with ``config.json``.
        dtype: weights dtype (``float32``, ``bfloat16``, ``float16``).
        tokenizer: tokenizer location if not ``path``.
        key: the config key of this spec, named in error messages.
        freeze: parameter-name prefixes kept fixed in training (e.g. ``[model.visual]``: a vision-language
            model's vision tower and merger, as LLaVA- and Qwen-VL-style fine-tunes often do).
        cross_vocab: as a teacher, it may have another tokenizer and chat template than the student: it scores the
            student's response text (``src/modules/cross_vocab.py``); ``cross_vocab_rule`` (``last`` or ``spread``)
            says how a span's log-ratio reaches the student's tokens.
        kwargs: passed to ``from_pretrained`` (``attn_implementation``, ``revision``, ...).
    """

    def __init__(self, path: str, dtype: str = "float32", tokenizer: str | None = None, key: str = "model",
                 trust_remote_code: bool = False, freeze: list[str] | None = None, cross_vocab: bool = False,
                 cross_vocab_rule: str = "last", **kwargs):
        if not path:
            raise ValueError(f"{key}.path is empty: give a hub id or a local model directory")
        self.path, self.key = str(path), key
        self.dtype = _dtype(dtype, key)
        self.tokenizer_path = str(tokenizer) if tokenizer else None
        self.trust_remote_code = trust_remote_code
        self.freeze = [str(f) for f in (freeze or [])]
        if not isinstance(cross_vocab, bool):
            raise ValueError(f"{key}.cross_vocab must be true or false, got {cross_vocab!r}")
        if cross_vocab_rule not in ("last", "spread"):
            raise ValueError(f"{key}.cross_vocab_rule must be 'last' or 'spread', got {cross_vocab_rule!r}")
        self.cross_vocab, self.cross_vocab_rule = cross_vocab, cross_vocab_rule
        self.kwargs = kwargs

    def _resolve(self, path: str, what: str) -> str:
        """A local folder (checked to exist) or a hub id ``owner/name``; anything else is named as missing here
        instead of after the hub's retries."""
        key = f"{self.key}.{'tokenizer' if what == 'tokenizer' else 'path'}"
        looks_local = path.startswith((".", "/", "~")) or os.sep in path.strip("/").split("/", 1)[-1] \
            or Path(path).expanduser().exists()
        if looks_local and not Path(path).expanduser().exists():
            raise FileNotFoundError(f"{key}={path!r}: no such folder ({Path(path).expanduser().absolute()})")
        if not looks_local and "/" not in path:
            raise FileNotFoundError(f"{key}={path!r}: no such folder ({Path(path).absolute()}), and not a hub id, "
                                    f"which has the form owner/name (e.g. Qwen/Qwen2.5-1.5B-Instruct)")
        return str(Path(path).expanduser()) if looks_local else path

    def load_model(self):
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

        path = self._resolve(self.path, "model")
        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=self.trust_remote_code)
            auto = AutoModelForImageTextToText if getattr(config, "vision_config", None) else AutoModelForCausalLM
            model, info = auto.from_pretrained(path, dtype=self.dtype, trust_remote_code=self.trust_remote_code,
                                               output_loading_info=True, **self.kwargs)
        except OSError as e:
            raise OSError(f"{self.key}: could not load model {path!r} ({e}). Offline? Set {self.key}.path to a "
                          "local directory.") from e
        except Exception as e:  # a truncated or corrupt weights file (safetensors' own error names no model)
            raise RuntimeError(f"{self.key}: could not read the weights of {path!r} ({type(e).__name__}: {e}); "
                               f"the file is truncated or corrupt") from e
        problems = {k: v for k, v in info.items() if k in ("missing_keys", "mismatched_keys") and v}
        if problems:  # from_pretrained would start those weights from random values and say so only in a log line
            listed = "; ".join(f"{k.replace('_', ' ')}: {len(v)}, e.g. {sorted(map(str, v))[:3]}"
                               for k, v in problems.items())
            raise ValueError(f"{self.key}: the weights in {path!r} do not cover the model ({listed}); a "
                             f"checkpoint with tensors removed or of another architecture")
        return self._frozen(model)

    def load_empty(self):
        """The model with no weights: built from its config on the meta device (nothing allocated), with its
        generation config and frozen parameters as ``load_model`` gives them. A sharded run fills it from rank 0
        (``src/modules/sharding.py``), so only one process reads the checkpoint into host memory."""
        from transformers import (
            AutoConfig,
            AutoModelForCausalLM,
            AutoModelForImageTextToText,
            GenerationConfig,
        )

        path = self._resolve(self.path, "model")
        revision = {k: self.kwargs[k] for k in ("revision",) if k in self.kwargs}
        config = AutoConfig.from_pretrained(path, trust_remote_code=self.trust_remote_code, **revision)
        auto = AutoModelForImageTextToText if getattr(config, "vision_config", None) else AutoModelForCausalLM
        # the build-time arguments load_model passes to from_pretrained (the rest concern reading weights)
        built = {k: self.kwargs[k] for k in ("attn_implementation",) if k in self.kwargs}
        with torch.device("meta"):
            model = auto.from_config(config, dtype=self.dtype, trust_remote_code=self.trust_remote_code, **built)
        try:
            model.generation_config = GenerationConfig.from_pretrained(path, **revision)
        except OSError:  # none saved: from_pretrained would have derived it from the config, as from_config did
            pass
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
        if Path(path).is_dir() and not any((Path(path) / f).exists() for f in TOKENIZER_FILES):
            raise FileNotFoundError(f"{self.key}: {path!r} holds no tokenizer ({', '.join(TOKENIZER_FILES[:3])}, ...); "
                                    f"set {self.key}.tokenizer to the folder or hub id of the model's tokenizer")
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

    def load_empty(self):
        self.build()
        return super().load_empty()

    def load_tokenizer(self):
        self.build()
        return super().load_tokenizer()

    def load_processor(self):
        self.build()
        return super().load_processor()


def save_atomically(path: Path, *objects) -> str:
    """``save_pretrained`` every object into ``path`` via a temporary folder: ranks that build the same folder
    race, the first rename wins. A folder at ``path`` without ``config.json`` is incomplete and replaced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".build-"))
    for obj in objects:
        if hasattr(obj, "should_save_on_this_rank"):
            # transformers writes a model's files only on global rank 0 once a process group is started; this
            # model was built here, and any rank (another node's, with its own cache) may be the one to save it
            obj.should_save_on_this_rank = lambda is_main_process: is_main_process
        obj.save_pretrained(tmp)
    if not (tmp / "config.json").exists():
        written = sorted(p.name for p in tmp.iterdir())
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"saving {path}: save_pretrained wrote no config.json (only {written}); nothing was cached")
    if path.exists() and not (path / "config.json").exists():
        aside = path.parent / f".incomplete-{path.name}-{os.getpid()}"
        try:
            os.rename(path, aside)
            shutil.rmtree(aside, ignore_errors=True)
        except OSError:  # another rank moved it first
            pass
    try:
        os.rename(tmp, path)
    except OSError:  # another rank finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return str(path)


PROBE = "Step 1: 12 + 34 = 46.\n  Answer:\t#### 46"


def round_trips(tokenizer, text: str = PROBE) -> bool:
    """Whether ``decode(encode(text)) == text``: spaces, newlines and digits survive the tokenizer."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids, clean_up_tokenization_spaces=False) == text
