"""Vision-language prompt data: chats with images as prompt rows, batched by a Qwen2-VL / Qwen2.5-VL
processor.

Rows. ``VisionPrompts`` reads one split (JSONL, JSON, Parquet or a ``datasets`` name, read as ``math.py``
reads them) and returns ``{"id", "prompt": [chat messages], "answer"[, "solution", "min_pixels",
"max_pixels"]}``; user content interleaves ``{"type": "image", "image": <PIL.Image | absolute path>}`` and
``{"type": "text", "text": ...}`` items. Each row takes the first layout that fits:

    layout         prompt                                    images                       answer
    messages       messages: chat, content text or items     in the items, or bare        answer, else the
                   (``{"type": "image", "image": ...}``)     ``{"type": "image"}`` items  last assistant
                                                             filled from ``images``       turn (dropped)
    conversations  LLaVA: [{"from": "human", "value"}, ...]  image / images               as messages
    question       problem / question / query / prompt text  images / decoded_image /     answer
                   (Geometry3K: problem; MathVista: question) image: one or a list

In text, each ``<image>`` marks where the next image goes; text without placeholders gets its images first
(Qwen's convention); a placeholder count that differs from the image count is a bad row. MathVista's
multiple choice: a non-empty ``choices`` list is rendered as ``Choices:\\n(A) ...\\n(B) ...`` after the
question and the reference becomes the *letter* of the choice equal to ``answer`` (graded as a letter); an
answer that is neither a choice nor a letter in range is a bad row.

An image may be a path (relative to ``image_root``, else to the data file's folder), an absolute path, a
``file://`` URI, a ``data:image/...;base64,`` URI, bytes, a ``{"bytes", "path"}`` dict as Parquet and
``datasets`` store it, or a PIL image. Each is decoded in full at load (``load()``, which also catches the
truncated files ``verify()`` passes); files stay paths in the row (decoded again per batch, so memory stays
small), the rest become PIL images. Remote URLs are refused: download them first. A missing or unreadable
image makes its row bad; bad rows are named ``file:line`` (``file:row i`` outside JSONL) with the image as
written and as resolved, all in one ``DataRowError`` (``on_error="raise"``) or one warning each (``skip``).

Batches. ``VisionPromptDataModule`` renders each chat with the processor's template, fetches and resizes the
images with ``qwen_vl_utils.process_vision_info`` (per-image ``min_pixels``/``max_pixels`` ride in the image
items: the item's own, else the row's, else the module's) and calls the processor on the whole batch, left
padded. ``batch["model_kwargs"]`` holds what the model needs beside ``input_ids``/``attention_mask``:

    pixel_values       [sum of patches over the batch's images, C * temporal_patch * patch**2]  (flat!)
    image_grid_thw     [images in the batch, 3]; image i has prod(image_grid_thw[i]) patches
    mm_token_type_ids  [B, P]; 1 on image tokens (Qwen2.5-VL's 3-D RoPE needs it)
    images_per_row     [B]; bookkeeping, not a model input (``src.modules.models.multimodal.model_inputs`` strips it)

``pixel_values`` is not batched by row, so ``t[idx]`` / ``repeat_interleave`` on it is wrong: select rows with
``split_vision_kwargs`` and expand groups with ``repeat_vision_kwargs`` (``src.modules.models.multimodal``).
"""

from __future__ import annotations

import base64
import binascii
import io
import string
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from src.datamodules.prompts import PromptDataModule
from src.datamodules.rows import (
    ID_FIELDS,
    BadRow,
    RowReader,
    check_on_error,
    checked_rows,
    reference_text,
    row_id,
)

PLACEHOLDER = "<image>"
PROMPT_FIELDS = ("problem", "question", "query", "prompt")
IMAGE_FIELDS = ("images", "decoded_image", "image")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


# ----------------------------------------------------------------------------------------------- images

def open_image(ref: Any, base: Path) -> Image.Image | str:
    """``ref`` decoded and checked: an absolute path for a file, else a loaded PIL image (raises BadRow)."""
    if isinstance(ref, Image.Image):
        return _decoded(lambda: ref, "given as a PIL image")
    if isinstance(ref, dict):  # Parquet / datasets: {"bytes", "path"}; OpenAI style: {"url"}
        ref = ref.get("bytes") or ref.get("path") or ref.get("url")
    if isinstance(ref, (bytes, bytearray)):
        data = bytes(ref)
        return _decoded(lambda: Image.open(io.BytesIO(data)), f"of {len(data)} bytes")
    if not isinstance(ref, str) or not ref:
        raise BadRow(f"image is {type(ref).__name__} {ref!r}, not a path, URI, bytes or PIL image")
    if ref.startswith("data:"):
        try:
            data = base64.b64decode(ref.split("base64,", 1)[1], validate=True)
        except (IndexError, binascii.Error) as e:
            raise BadRow(f"image {ref[:40]!r}...: not a base64 data URI") from e
        return _decoded(lambda: Image.open(io.BytesIO(data)), f"{ref[:30]!r}...")
    if ref.startswith(("http://", "https://")):
        raise BadRow(f"image {ref!r}: remote images are not fetched at load; download them and give paths")
    path = Path(ref.removeprefix("file://")).expanduser()
    path = (path if path.is_absolute() else base / path).resolve()
    if not path.is_file():
        raise BadRow(f"image {ref!r} ({path}): no such file")
    with _decoded(lambda: Image.open(path), f"{ref!r} ({path})"):
        pass
    return str(path)


def _decoded(opener, shown: str) -> Image.Image:
    try:
        image = opener()
        image.load()
        return image
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for broken files
        raise BadRow(f"image {shown}: unreadable ({type(e).__name__}: {e})") from e


# ------------------------------------------------------------------------------------------------- rows

class VisionPrompts:
    """One split of a vision-language data set; calling it returns the rows (see the module docstring).

    Args:
        path: ``.jsonl``, ``.json`` or ``.parquet`` file (or give ``dataset``).
        image_root: folder that relative image paths start from (default: the data file's folder).
        prompt_field, answer_field, image_field: replace the layout's field.
        choices_field: multiple-choice options (MathVista); rendered as lettered options.
        on_error: ``raise`` (one ``DataRowError`` naming every bad row) or ``skip`` (warn about each).
        limit: stop after this many good rows (later images are not opened).
        dataset, subset, split: ``datasets.load_dataset(dataset, subset, split=split)``.
    """

    def __init__(self, path: str | None = None, image_root: str | None = None,
                 prompt_field: str | None = None, answer_field: str = "answer",
                 image_field: str | None = None, choices_field: str = "choices", on_error: str = "raise",
                 limit: int | None = None, dataset: str | None = None, subset: str | None = None,
                 split: str = "test"):
        check_on_error(on_error, limit)
        self.reader = RowReader(path, dataset, subset, split)
        self.name = self.reader.name
        root = image_root or (Path(path).parent if path is not None else ".")
        self.image_root = Path(root).expanduser()
        self.prompt_field, self.answer_field, self.image_field = prompt_field, answer_field, image_field
        self.choices_field, self.on_error, self.limit = choices_field, on_error, limit

    def __call__(self) -> list[dict]:
        records, by_line = self.reader.records()
        return checked_rows(self.name, records, by_line, self._row, self.on_error, self.limit)

    def _row(self, pos: int, record: dict) -> dict:
        image_field = self.image_field or next((f for f in IMAGE_FIELDS if record.get(f) is not None), None)
        refs = record.get(image_field) if image_field else None
        images = [] if refs is None else list(refs) if isinstance(refs, (list, tuple)) else [refs]
        answer = reference_text(record.get(self.answer_field))
        fields = (self.prompt_field,) if self.prompt_field else ("messages", "conversations", *PROMPT_FIELDS)
        prompt_field = next((f for f in fields if record.get(f)), None)
        if prompt_field is None:
            raise BadRow(f"missing or empty prompt: none of {list(fields)} (has {sorted(record)})")
        prompt = record[prompt_field]
        if isinstance(prompt, str):
            text, answer = self._choices(prompt, answer, record.get(self.choices_field))
            messages = [{"role": "user", "content": text}]
        elif isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
            messages = [{"role": ROLES.get(m.get("role", m.get("from")), m.get("role", m.get("from"))),
                         "content": m.get("content", m.get("value"))} for m in prompt]
        else:
            raise BadRow(f"prompt {prompt_field!r} is a {type(prompt).__name__}, not text or chat messages")
        if messages and messages[-1]["role"] == "assistant":  # a training chat: its reply is the answer
            reply = messages.pop()["content"]
            answer = answer or (reply if isinstance(reply, str) else " ".join(
                i.get("text", "") for i in reply if isinstance(i, dict))).strip()
        if not messages or messages[-1]["role"] != "user":
            raise BadRow("the chat does not end with a user turn")
        if not answer:
            raise BadRow(f"missing or empty answer (field {self.answer_field!r})")
        row = {"id": row_id(record, pos, (*ID_FIELDS, "pid")),
               "prompt": self._place_images(messages, images), "answer": answer}
        if isinstance(record.get("solution"), str) and record["solution"].strip():
            row["solution"] = record["solution"].strip()
        row.update({k: record[k] for k in ("min_pixels", "max_pixels") if record.get(k) is not None})
        return row

    @staticmethod
    def _choices(question: str, answer: str, choices: Any) -> tuple[str, str]:
        if choices is None or len(choices) == 0:
            return question, answer
        choices = [str(c).strip() for c in choices]
        letters = string.ascii_uppercase[: len(choices)]
        text = question.rstrip() + "\nChoices:\n" + "\n".join(f"({x}) {c}" for x, c in zip(letters, choices))
        if answer in choices:
            return text, letters[choices.index(answer)]
        if len(answer) == 1 and answer.upper() in letters:
            return text, answer.upper()
        raise BadRow(f"answer {answer!r} is none of the choices {choices}")

    def _place_images(self, messages: list[dict], images: list) -> list[dict]:
        """Messages whose content is a list of items, every image decoded and placed (module docstring)."""
        pending, errors, slots = list(images), [], 0

        def image_item(ref, extra: dict) -> dict | None:
            try:
                return {**extra, "type": "image", "image": open_image(ref, self.image_root)}
            except BadRow as e:
                errors.append(str(e))

        def next_image(extra: dict) -> dict | None:  # an <image> placeholder or a bare image item
            nonlocal slots
            slots += 1
            return image_item(pending.pop(0), extra) if pending else None

        out = []
        for m in messages:
            content, items = m["content"], []
            if isinstance(content, str):
                for k, part in enumerate(content.split(PLACEHOLDER)):
                    items += [next_image({})] if k else []
                    items += [{"type": "text", "text": part.strip()}] if part.strip() else []
            elif isinstance(content, list):
                for item in content:
                    if not isinstance(item, dict):
                        raise BadRow(f"content item {item!r} is not an object")
                    kind = item.get("type", "image" if "image" in item else "text")
                    extra = {k: v for k, v in item.items() if k in ("min_pixels", "max_pixels")}
                    if kind not in ("image", "image_url", "text"):
                        raise BadRow(f"content item of type {kind!r}: only text and image are supported")
                    ref = item.get("image", item.get("image_url"))
                    items.append({"type": "text", "text": item.get("text", "")} if kind == "text" else
                                 image_item(ref, extra) if ref is not None else next_image(extra))
            else:
                raise BadRow(f"{m['role']} message content is a {type(content).__name__}")
            out.append({"role": m["role"], "content": items})
        if slots == 0 and pending:  # no placeholders: the images lead the first user turn
            first = next(m for m in out if m["role"] == "user")
            first["content"][:0] = [image_item(ref, {}) for ref in pending]
        elif slots != len(images):
            raise BadRow(f"{slots} image placeholders but {len(images)} images in the row")
        if errors:
            raise BadRow("; ".join(errors))
        return out


# ---------------------------------------------------------------------------------------------- batches

class _Chats(torch.utils.data.Dataset):
    def __init__(self, chats: list, answers: list, targets: list | None, row_ids: list):
        self.chats, self.answers, self.targets, self.row_ids = chats, answers, targets, row_ids

    def __len__(self):
        return len(self.chats)

    def __getitem__(self, i):
        target = self.targets[i] if self.targets is not None else None
        return self.chats[i], self.answers[i], target, self.row_ids[i]


class VisionPromptDataModule(PromptDataModule):
    """``PromptDataModule`` for chats with images; batches carry ``model_kwargs`` (module docstring).

    Args:
        min_pixels, max_pixels: default pixel budget of an image (``qwen_vl_utils`` resizes it to fit, in
            multiples of patch * merge size); a row's or image item's own value wins. The processor's own
            bounds still apply after, so keep these inside them.
        other arguments: as ``PromptDataModule``; ``instruction`` is appended to the last user turn's text.
    """

    def __init__(self, train, val=None, test=None, min_pixels: int | None = None,
                 max_pixels: int | None = None, **kwargs):
        super().__init__(train, val, test, **kwargs)
        self.pixels = {"min_pixels": min_pixels, "max_pixels": max_pixels}
        self.processor = None

    def set_processor(self, processor) -> None:
        if not (hasattr(processor, "image_processor") and hasattr(processor, "tokenizer")):
            raise TypeError(f"VisionPromptDataModule needs the student's processor (AutoProcessor of a "
                            f"Qwen2-VL / Qwen2.5-VL model), got a {type(processor).__name__}")
        processor.tokenizer.padding_side = "left"  # every response starts in the same column
        self.processor, self.tokenizer = processor, processor.tokenizer

    def set_tokenizer(self, tokenizer) -> None:
        self.set_processor(tokenizer)  # the framework hands over what the student spec loads

    def messages(self, row: dict) -> list[dict]:
        prompt = row["prompt"]
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
        # copies of the items: the pixel budgets and the instruction must not leak into the source rows
        msgs = [{**m, "content": [dict(i) for i in m["content"]] if isinstance(m["content"], list)
                 else m["content"]} for m in prompt]
        for m in msgs:
            for item in m["content"] if isinstance(m["content"], list) else []:
                if item.get("type") == "image":
                    for key, default in self.pixels.items():
                        if key not in item and row.get(key, default) is not None:
                            item[key] = row.get(key, default)
        if self.instruction:
            last = next(m for m in reversed(msgs) if m["role"] == "user")
            if isinstance(last["content"], str):
                last["content"] = f"{last['content']}\n{self.instruction}"
            elif last["content"] and last["content"][-1].get("type") == "text":
                last["content"][-1]["text"] = f"{last['content'][-1]['text']}\n{self.instruction}"
            else:
                last["content"].append({"type": "text", "text": self.instruction})
        if self.system_prompt and msgs[0]["role"] != "system":
            msgs = [{"role": "system", "content": self.system_prompt}] + msgs
        return msgs

    def setup(self, stage: str | None = None) -> None:
        if self.processor is None:
            raise RuntimeError("VisionPromptDataModule.set_processor(processor) must come before setup()")
        if self.teacher_prompts:
            raise ValueError("data.teacher_context and model.teacher.cross_vocab are not supported for vision-language "
                             "data: the teacher scores the student's prompt and tokens")
        for split, source in self.sources.items():
            if source is None or split in self.splits:
                continue
            rows = source()
            chats = [self.messages(r) for r in rows]
            if self.max_prompt_tokens:
                for i, chat in enumerate(chats):
                    if (n := self.prompt_tokens(chat)) > self.max_prompt_tokens:
                        raise ValueError(f"{split} row {rows[i].get('id', i)}: prompt has {n} tokens (images "
                                         "included) > data.max_prompt_tokens")
            targets = None
            if rows and all("solution" in r for r in rows):
                targets = [self.tokenizer(r["solution"], add_special_tokens=False)["input_ids"] for r in rows]
            self.splits[split] = _Chats(chats, [r["answer"] for r in rows], targets,
                                        [r.get("id", i) for i, r in enumerate(rows)])

    def longest_prompts(self, teacher: bool = False) -> dict[str, tuple[int, object]]:
        """Per split, its longest prompt's (token count, images expanded as ``prompt_tokens`` counts them, row id); the
        teacher reads the student's prompts, so it has none of its own (``teacher``)."""
        if teacher:
            return {}
        out = {}
        for split, data in self.splits.items():
            if len(data):
                counts = [self.prompt_tokens(chat) for chat in data.chats]
                i = max(range(len(counts)), key=counts.__getitem__)
                out[split] = (counts[i], data.row_ids[i])
        return out

    def prompt_tokens(self, chat: list[dict]) -> int:
        """Tokens of the rendered prompt with every image expanded, without resizing any image."""
        from qwen_vl_utils import extract_vision_info
        from qwen_vl_utils.vision_process import IMAGE_MAX_TOKEN_NUM, IMAGE_MIN_TOKEN_NUM, smart_resize

        text = self.processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        n = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        ip = self.processor.image_processor
        factor = ip.patch_size * ip.merge_size
        for item in extract_vision_info(chat):
            image = item["image"]
            if isinstance(image, Image.Image):
                w, h = image.size
            else:
                with Image.open(image) as im:
                    w, h = im.size
            h, w = smart_resize(h, w, factor, item.get("min_pixels", IMAGE_MIN_TOKEN_NUM * factor**2),
                                item.get("max_pixels", IMAGE_MAX_TOKEN_NUM * factor**2))
            n += ip.get_number_of_image_patches(h, w, {}) // ip.merge_size**2 - 1  # 1 pad already counted
        return n

    def collate(self, items) -> dict:
        from qwen_vl_utils import extract_vision_info, process_vision_info

        chats, answers, targets, row_ids = zip(*items)
        proc = self.processor
        texts = [proc.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
        images, _ = process_vision_info(list(chats), image_patch_size=proc.image_processor.patch_size)
        enc = proc(text=texts, images=images, padding=True, return_tensors="pt")
        model_kwargs = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
        model_kwargs["images_per_row"] = torch.tensor([len(extract_vision_info(c)) for c in chats])
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                 "references": list(answers), "ids": list(row_ids), "model_kwargs": model_kwargs}
        if targets[0] is not None:
            batch["target_ids"] = list(targets)
        return batch
