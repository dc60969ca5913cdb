"""Two probes of the visual miniature's models, behind the findings in docs/results/visual_reasoning.md.

    python benchmarks/visual_probes.py order MODEL [MODEL ...]
    python benchmarks/visual_probes.py sharpness STUDENT TEACHER

MODEL, STUDENT, TEACHER: Hugging Face folders of tiny Qwen2.5-VL models, e.g. the cached stages
``.cache/stages/visual_student_init-<hash>`` (``python src/train.py experiment=visual_reasoning miniature=visual``
builds them).

``order``: does the model read the cells in order? For 40 three-digit images (random distinct digits,
rendered as the task renders them) it
compares the first response token's distribution (the first digit of the written sum) on the image with the
same digits in reverse order, against the same digits rendered again with other ink (noise level), and
counts how often its argmax is the image's first digit. A model that sees the cells as an unordered bag
changes no more under reversal than under re-rendering.

``sharpness``: how far can the student move along a training direction before it breaks? For one batch of
64 training prompts it computes the gradients of three losses: SFT on the reference solutions, REOPOLD's
exploration-phase loss and vanilla OPD on the student's own samples (rewards from the teacher). It steps
the weights along each normalised gradient (and along a random direction) by a few norms, and reports
greedy test accuracy (96 prompts) and the SFT loss after each; then the SFT loss's finite-difference
slope along its gradient at three step sizes (equal to ``-|g|`` for a correct gradient, in a flat enough
region).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

TASK = dict(n_digits=3, cell_size=28, jitter=0, background="grey", image_first=False)  # data=visual_mini
PIXELS = dict(min_pixels=784, max_pixels=12544)


def _load(path: str):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return AutoProcessor.from_pretrained(path), AutoModelForImageTextToText.from_pretrained(path).eval()


def _datamodule(processor, **splits):
    from src.datamodules.vision import VisionPromptDataModule
    from src.datamodules.visual_task import VisualTask

    sources = {k: VisualTask(k, n, **TASK) for k, n in splits.items()}
    dm = VisionPromptDataModule(train=sources.get("train"), test=sources.get("test"), batch_size=splits.get("train", 1),
                                eval_batch_size=splits.get("test", 1), **PIXELS)
    dm.set_processor(processor)
    dm.setup("fit" if "train" in splits else "test")
    if "train" in splits and "test" in splits:
        dm.setup("test")
    return dm


def order(paths: list[str], n: int = 40) -> list[dict]:
    from PIL import ImageFont

    from src.datamodules.visual_task import QUESTION, VisualTask
    from src.modules.models.multimodal import model_inputs

    out = []
    for path in paths:
        processor, model = _load(path)
        task = VisualTask("test", 1, **TASK)
        font = ImageFont.load_default(size=task.font_size)
        dm = _datamodule(processor)
        tok = processor.tokenizer

        def first_token_logp(digits, seed):
            image = task.render(digits, random.Random(seed), font)
            chat = dm.messages({"prompt": [{"role": "user", "content": [
                {"type": "text", "text": QUESTION}, {"type": "image", "image": image}]}]})
            batch = dm.collate([(chat, "0", None, 0)])
            with torch.no_grad():
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               **model_inputs(batch["model_kwargs"])).logits
            return logits[0, -1].log_softmax(-1)

        def kl(a, b):
            return float((a.exp() * (a - b)).sum())

        rng, same, reversed_, first = random.Random(0), [], [], 0
        for i in range(n):
            digits = rng.sample(range(10), 3)
            a = first_token_logp(digits, i)
            same.append(kl(a, first_token_logp(digits, 1000 + i)))
            reversed_.append(kl(a, first_token_logp(digits[::-1], i)))
            first += tok.decode([int(a.argmax())]) == str(digits[0])
        row = {"model": path, "kl_rerender": sum(same) / n, "kl_reversed": sum(reversed_) / n,
               "first_digit_argmax": f"{first}/{n}"}
        print(f"{path}: KL(first token) re-rendered {row['kl_rerender']:.3f}, cells reversed "
              f"{row['kl_reversed']:.3f}; argmax is the first digit {first}/{n}", flush=True)
        out.append(row)
    return out


def sharpness(student: str, teacher: str, steps=(0.01, 0.03, 0.1, 0.3)) -> dict:
    from src.modules.evaluation.grading import grade
    from src.modules.method.clipping import mixture_floor
    from src.modules.method.selection import RewardFloor
    from src.modules.models.multimodal import vision_token_ids
    from src.modules.rollout.batch import reference_rollout
    from src.modules.rollout.hf import HFGenerateRollout
    from src.modules.scoring import score_tokens

    torch.manual_seed(0)
    processor, model = _load(student)
    _, teacher_model = _load(teacher)
    tok, banned = processor.tokenizer, torch.tensor(vision_token_ids(processor))
    dm = _datamodule(processor, train=64, test=96)
    batch, test = next(iter(dm.train_dataloader())), next(iter(dm.test_dataloader()))
    rollout = HFGenerateRollout(max_new_tokens=24)

    def accuracy():
        model.eval()
        ro = rollout(model, test["input_ids"], test["attention_mask"], [tok.eos_token_id], tok.pad_token_id,
                     greedy=True, banned_ids=banned, **test["model_kwargs"])
        texts = tok.batch_decode(torch.where(ro.response_mask_BT, ro.response_ids_BT, tok.pad_token_id),
                                 skip_special_tokens=True)
        return sum(grade(t, a)[0] for t, a in zip(texts, test["references"])) / len(texts)

    ro = rollout(model, batch["input_ids"], batch["attention_mask"], [tok.eos_token_id], tok.pad_token_id,
                 banned_ids=banned, **batch["model_kwargs"])
    ref = reference_rollout(batch, tok.eos_token_id, tok.pad_token_id)
    with torch.no_grad():
        teacher_logp, _ = score_tokens(teacher_model, ro.input_ids, ro.attention_mask, ro.response_start,
                                         banned_ids=banned, **ro.model_kwargs)
    reward, valid = teacher_logp - ro.old_logp_BT, ro.response_mask_BT
    explore = RewardFloor(mixture_floor(0.1))(reward, valid)  # REOPOLD's exploration mask
    model.train()

    def logp(r):
        return score_tokens(model, r.input_ids, r.attention_mask, r.response_start, banned_ids=banned,
                              with_entropy=False, **r.model_kwargs)[0]

    losses = {
        "sft": lambda: -(logp(ref) * ref.response_mask_BT).sum() / ref.response_mask_BT.sum(),
        "reopold_explore": lambda: -(reward * explore * logp(ro)).sum() / explore.sum(),
        "opd": lambda: -(reward * valid * logp(ro)).sum() / valid.sum(),
    }
    params = list(model.parameters())
    base = [p.detach().clone() for p in params]

    def place(direction, size):
        norm = torch.sqrt(sum((d ** 2).sum() for d in direction))
        with torch.no_grad():
            for p, b, d in zip(params, base, direction):
                p.copy_(b - size * d / norm)

    def gradient(name):
        model.zero_grad()
        losses[name]().backward()
        return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]

    with torch.no_grad():
        sft0 = float(losses["sft"]())
    result = {"base": {"acc": accuracy(), "sft_loss": sft0}, "steps": {}}
    print(f"start: greedy test acc {result['base']['acc']:.3f}, SFT loss {sft0:.4f}", flush=True)
    generator = torch.Generator().manual_seed(0)
    directions = {name: gradient(name) for name in losses}
    directions["random"] = [torch.randn(p.shape, generator=generator) for p in params]
    for name, direction in directions.items():
        for size in steps:
            place(direction, size)
            with torch.no_grad():
                loss = float(losses["sft"]())
            acc = accuracy()
            result["steps"][f"{name}@{size}"] = {"acc": acc, "sft_loss": loss}
            print(f"{name:16s} step {size:<5}: greedy test acc {acc:.3f}, SFT loss {loss:.4f}", flush=True)
    g = directions["sft"]
    g_norm = float(torch.sqrt(sum((d ** 2).sum() for d in g)))
    result["slope"] = {"minus_grad_norm": -g_norm}
    for eps in (1e-4, 1e-3, 1e-2):
        place(g, eps)
        with torch.no_grad():
            slope = (float(losses["sft"]()) - sft0) / eps
        result["slope"][str(eps)] = slope
        print(f"SFT loss slope along -g at {eps:g}: {slope:.4f} (-|g| = {-g_norm:.4f})", flush=True)
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="probe", required=True)
    o = sub.add_parser("order")
    o.add_argument("models", nargs="+")
    s = sub.add_parser("sharpness")
    s.add_argument("student")
    s.add_argument("teacher")
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    return order(args.models) if args.probe == "order" else sharpness(args.student, args.teacher)


if __name__ == "__main__":
    main()
