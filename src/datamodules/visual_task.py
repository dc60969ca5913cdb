"""Synthetic visual arithmetic: a small image shows ``n_digits`` digits; the model reads them and adds them.

Example (``n_digits=3``; the image shows 3, 5 and 4 from left to right)::

    prompt:   [image] "Add the digits in the image."
    solution: "3+5=8\\n8+4=12\\n#### 12"

Digit ``i`` is drawn in the ``i``-th of ``n_digits`` vertical strips, at a random place inside it, in a
random dark colour on a random light background (PIL's default font), so left to right is reading order
and glyphs never overlap; ``distractors`` adds light circles behind the digits. With ``cell_size`` the
canvas is instead a row of ``n_digits`` square cells (``n_digits * cell_size`` by ``cell_size`` pixels), one
digit in each: at ``cell_size=28`` each cell is exactly one merged Qwen2.5-VL image token (2 x 2 patches of
14 px), the layout the CPU miniature uses so a tiny vision tower learns to read in minutes. Rows are
deterministic functions of ``(seed, split, n_digits, image_size, cell_size, ...)``.

Splits are disjoint by the digit sequence (``arithmetic.split_of``, a sha256 digest of it): no validation
or test image shows a sequence seen in training. A split's sequences are shuffled and taken in turn; past
``n`` = their number, they come round again with fresh renderings.

Noisy demonstrations (``misread``, ``misread_share``): in a share of the rows that show a digit in ``misread``, the
written solution reads that digit as another one (``{8: 3}``: every 8 of the row read as a 3), while ``answer``
stays the image's true sum. A student trained on them to a plateau misreads greedily but still writes the right
reading in some of its samples: its accuracy is set by its data, and the teacher's per-token log-ratio can tell
its right readings from its misreadings (the visual miniature's warm start; the math miniature's forgotten carry is
the same design).

``VisualTask.save(folder)`` writes the rows as ``<split>.jsonl`` (Geometry3K's layout: ``problem`` with
``<image>``, ``images``, ``answer``, ``solution``) and ``images/<id>.png``; ``VisionPrompts`` reads it back.
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from src.datamodules.arithmetic import split_of

QUESTION = "Add the digits in the image."


def sum_steps(digits: list[int]) -> str:
    """Running sum, one addition a line: ``[3, 5, 4]`` -> ``"3+5=8\\n8+4=12\\n#### 12"``."""
    total, lines = digits[0], []
    for d in digits[1:]:
        lines.append(f"{total}+{d}={total + d}")
        total += d
    return "\n".join(lines + [f"#### {total}"])


class VisualTask:
    """Rows ``{"id", "prompt": [chat with a PIL image], "answer", "solution", "digits"}`` of one split.

    Args:
        split: ``train``, ``val`` or ``test``.
        n: number of rows.
        n_digits: digits in each image (difficulty knob; at most 6).
        image_size: side of the square canvas in pixels.
        cell_size: if given, a row of square cells of this side instead (``image_size`` is then unused).
        jitter: how far (pixels) a glyph may move from the centre of its strip or cell (default: anywhere
            it fits; difficulty knob).
        background: ``light`` (random light colours, dark ink) or ``grey`` (near the image processor's mean
            colour, so the background adds almost nothing to a patch's features; near-black ink).
        image_first: the image before the question in the user turn (else after it, next to the answer).
        seed: sampling and rendering seed.
        font_size: glyph size (default: as large as ``n_digits`` strips allow, at most 0.4 * image_size).
        distractors: light circles drawn behind the digits (difficulty knob).
        val_frac, test_frac: shares of the digit sequences held out.
        misread: digit -> the digit a noisy demonstration writes for it (keys and values in 0-9); ``None``: none.
        misread_share: the share of the rows showing a digit in ``misread`` whose solution misreads it (drawn per
            digit sequence, so a sequence is read the same way wherever it comes round).
    """

    def __init__(self, split: str = "train", n: int = 1000, n_digits: int = 3, image_size: int = 56,
                 seed: int = 0, font_size: int | None = None, distractors: int = 0, val_frac: float = 0.1,
                 test_frac: float = 0.1, cell_size: int | None = None, jitter: int | None = None,
                 background: str = "light", image_first: bool = True, misread: dict | None = None,
                 misread_share: float = 0.0):
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be train, val or test, got {split!r}")
        if not 1 <= n_digits <= 6:
            raise ValueError(f"n_digits must lie in 1..6, got {n_digits}")
        if cell_size is not None and cell_size < 8:
            raise ValueError(f"cell_size must be at least 8 pixels, got {cell_size}")
        self.split, self.n, self.n_digits, self.image_size, self.seed = split, n, n_digits, image_size, seed
        if jitter is not None and jitter < 0:
            raise ValueError(f"jitter must be >= 0 pixels, got {jitter}")
        if background not in ("light", "grey"):
            raise ValueError(f"background must be 'light' or 'grey', got {background!r}")
        self.cell_size, self.jitter, self.background, self.image_first = cell_size, jitter, background, image_first
        default = 0.8 * cell_size if cell_size else min(0.4 * image_size, 1.5 * image_size / n_digits)
        self.font_size = font_size or max(8, int(default))
        self.distractors, self.val_frac, self.test_frac = distractors, val_frac, test_frac
        self.misread = {int(k): int(v) for k, v in (misread or {}).items()}
        if any(not (0 <= d <= 9 and 0 <= r <= 9 and d != r) for d, r in self.misread.items()):
            raise ValueError(f"misread maps a digit 0-9 to another digit 0-9, got {dict(misread)}")
        if not 0.0 <= misread_share <= 1.0:
            raise ValueError(f"misread_share must lie in [0, 1], got {misread_share}")
        self.misread_share = misread_share

    def __call__(self) -> list[dict]:
        sequences = ["".join(s) for s in itertools.product("0123456789", repeat=self.n_digits)]
        sequences = [s for s in sequences if split_of(s, self.val_frac, self.test_frac) == self.split]
        if not sequences:
            raise ValueError(f"no {self.n_digits}-digit sequence falls in split {self.split!r}; add digits")
        layout = self.image_size if self.cell_size is None else f"cells{self.cell_size}"
        layout = layout if self.jitter is None else f"{layout}-j{self.jitter}"
        layout = layout if self.background == "light" else f"{layout}-{self.background}"
        rng = random.Random(f"{self.seed}-{self.split}-{self.n_digits}-{layout}-{self.distractors}")
        rng.shuffle(sequences)
        font = ImageFont.load_default(size=self.font_size)
        rows = []
        for i in range(self.n):
            digits = [int(c) for c in sequences[i % len(sequences)]]
            image = self.render(digits, rng, font)
            content = [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]
            rows.append({"id": f"{self.split}-{i}",
                         "prompt": [{"role": "user", "content": content if self.image_first else content[::-1]}],
                         "answer": str(sum(digits)), "solution": sum_steps(self.read(digits)), "digits": digits})
        return rows

    def read(self, digits: list[int]) -> list[int]:
        """The digits a demonstration writes for ``digits``: misread in ``misread_share`` of the sequences that
        show a digit in ``misread``, as they are otherwise."""
        if not set(digits) & self.misread.keys():
            return digits
        draw = random.Random(f"{self.seed}-misread-{''.join(map(str, digits))}").random()
        return [self.misread.get(d, d) for d in digits] if draw < self.misread_share else digits

    def render(self, digits: list[int], rng: random.Random, font) -> Image.Image:
        if self.cell_size:
            W, S = self.cell_size * len(digits), self.cell_size
            strip = self.cell_size
        else:
            W = S = self.image_size
            strip = S // len(digits)
        if self.background == "grey":  # about the processor's normalisation mean (0.48, 0.46, 0.41) * 255
            image = Image.new("RGB", (W, S), tuple(c + rng.randint(-8, 8) for c in (122, 116, 104)))
        else:
            image = Image.new("RGB", (W, S), tuple(rng.randint(200, 255) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        for _ in range(self.distractors):
            x, y, r = rng.randrange(W), rng.randrange(S), rng.randint(2, max(2, S // 8))
            draw.ellipse((x - r, y - r, x + r, y + r), outline=tuple(rng.randint(150, 200) for _ in range(3)))
        for k, d in enumerate(digits):
            left, top, right, bottom = font.getbbox(str(d))
            w, h = right - left, bottom - top
            if w > strip or h > S:
                raise ValueError(f"{len(digits)} digits of font_size {self.font_size} do not fit {W}x{S}px")
            x, y = k * strip + self._offset(rng, strip - w), self._offset(rng, S - h)
            ink = tuple(rng.randint(0, 110 if self.background == "light" else 40) for _ in range(3))
            draw.text((x - left, y - top), str(d), font=font, fill=ink)
        return image

    def _offset(self, rng: random.Random, free: int) -> int:
        """Where a glyph starts in ``free`` spare pixels: anywhere, or within ``jitter`` of the centre."""
        if self.jitter is None:
            return rng.randint(0, free)
        centre = free // 2
        return rng.randint(max(0, centre - self.jitter), min(free, centre + self.jitter))

    def save(self, folder: str | Path) -> Path:
        """Write ``folder/<split>.jsonl`` and ``folder/images/<id>.png``; returns the JSONL path."""
        folder = Path(folder)
        (folder / "images").mkdir(parents=True, exist_ok=True)
        lines = []
        for row in self():
            name = f"images/{row['id']}.png"
            next(c["image"] for c in row["prompt"][0]["content"] if c["type"] == "image").save(folder / name)
            problem = f"<image>{QUESTION}" if self.image_first else f"{QUESTION}<image>"
            lines.append(json.dumps({"id": row["id"], "problem": problem, "images": [name],
                                     **{k: row[k] for k in ("answer", "solution", "digits")}}))
        path = folder / f"{self.split}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        return path
