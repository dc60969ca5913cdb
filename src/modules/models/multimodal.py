"""Vision-language batches: the ``model_kwargs`` that travel with a rollout, and their rows.

A Qwen2-VL / Qwen2.5-VL processor returns, besides ``input_ids`` [B, P]:

    pixel_values        [patches in the batch, D]  flat, not one block per row
    image_grid_thw      [images in the batch, 3]   image i owns prod(image_grid_thw[i]) patches
    mm_token_type_ids   [B, P]                     (transformers 5) 1 on image tokens, for 3-D RoPE
and the datamodule adds ``images_per_row`` [B] (bookkeeping, never passed to the model).

Selecting rows (minibatches) or repeating them (G samples per prompt) must go through the images and
patches each row owns: ``split_vision_kwargs`` / ``repeat_vision_kwargs``. ``model_inputs`` strips the
bookkeeping and pads ``mm_token_type_ids`` to cover appended response columns.
"""

from __future__ import annotations

import torch

PER_PATCH, PER_IMAGE = ("pixel_values",), ("image_grid_thw",)
BOOKKEEPING = ("images_per_row",)


def has_images(model_kwargs: dict) -> bool:
    return "images_per_row" in model_kwargs


def is_multimodal(model) -> bool:
    return getattr(model.config, "vision_config", None) is not None


def model_inputs(model_kwargs: dict, seq_len: int | None = None) -> dict:
    """What the model's ``forward``/``generate`` takes: bookkeeping dropped (``generate`` rejects unknown
    kwargs), and ``mm_token_type_ids`` [B, P] right-padded with text (0) to ``seq_len`` columns once
    responses have been appended to the prompts (scoring ``[B, P + T]``)."""
    out = {k: v for k, v in model_kwargs.items() if k not in BOOKKEEPING}
    types = out.get("mm_token_type_ids")
    if seq_len is not None and types is not None and types.shape[1] < seq_len:
        out["mm_token_type_ids"] = torch.nn.functional.pad(types, (0, seq_len - types.shape[1]))
    return out


def kwargs_of_rows(model_kwargs: dict, row_index: torch.Tensor, B: int) -> dict:
    """``model_kwargs`` of rows ``row_index`` of a ``B``-row batch: a vision-language batch's through its images
    (``split_vision_kwargs``), otherwise every tensor with ``B`` rows indexed by row."""
    if has_images(model_kwargs):
        return split_vision_kwargs(model_kwargs, row_index)
    return {k: v[row_index.to(v.device)] if isinstance(v, torch.Tensor) and v.shape[:1] == (B,) else v
            for k, v in model_kwargs.items()}


def split_vision_kwargs(model_kwargs: dict, row_index) -> dict:
    """``model_kwargs`` of the rows ``row_index`` (any order, repeats allowed), as if those rows alone had
    been collated: image-level tensors are gathered through each row's images (``images_per_row``) and
    patches (``prod(image_grid_thw[i])`` per image); other tensors with B rows are indexed by row."""
    if "pixel_values_videos" in model_kwargs:
        raise NotImplementedError("video inputs: rows would need per-row video counts")
    per_row = model_kwargs["images_per_row"].cpu()
    B, none = per_row.shape[0], torch.zeros(0, dtype=torch.long)
    idx = torch.as_tensor(row_index, dtype=torch.long).flatten().cpu()
    grid = model_kwargs.get("image_grid_thw")
    patches = grid.prod(-1).cpu() if grid is not None else none
    # row r owns images first_image[r] .. first_image[r + 1] - 1; image i likewise its patches
    first_image = torch.cat([none.new_zeros(1), per_row.cumsum(0)])  # [B + 1]
    first_patch = torch.cat([none.new_zeros(1), patches.cumsum(0)])  # [images + 1]
    pixels = model_kwargs.get("pixel_values")
    if first_image[-1] != len(patches) or (pixels is not None and len(pixels) != first_patch[-1]):
        raise ValueError(f"inconsistent vision kwargs: images_per_row sums to {int(first_image[-1])}, "
                         f"image_grid_thw has {len(patches)} images of {int(first_patch[-1])} patches, "
                         f"pixel_values {None if pixels is None else len(pixels)} rows")
    image_idx = torch.cat([torch.arange(first_image[r], first_image[r + 1]) for r in idx.tolist()] or [none])
    patch_idx = torch.cat([torch.arange(first_patch[i], first_patch[i + 1])
                           for i in image_idx.tolist()] or [none])
    out = {}
    for k, v in model_kwargs.items():
        if k in PER_PATCH + PER_IMAGE and len(image_idx) == 0:
            continue  # as the processor leaves them out of a batch without images
        if k in PER_PATCH:
            v = v.index_select(0, patch_idx.to(v.device))
        elif k in PER_IMAGE:
            v = v.index_select(0, image_idx.to(v.device))
        elif isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == B:
            v = v.index_select(0, idx.to(v.device))
        out[k] = v
    return out


def repeat_vision_kwargs(model_kwargs: dict, G: int) -> dict:
    """``model_kwargs`` for each row repeated ``G`` times in place (rows ``[b*G:(b+1)*G]`` share prompt b),
    the vision counterpart of ``repeat_interleave(G, dim=0)``."""
    B = model_kwargs["images_per_row"].shape[0]
    return split_vision_kwargs(model_kwargs, torch.arange(B).repeat_interleave(G))


VISION_SETTINGS = ("patch_size", "merge_size", "temporal_patch_size", "min_pixels", "max_pixels")
VISION_TOKENS = ("image_token", "video_token", "vision_start_token", "vision_end_token")


def vision_token_ids(processor) -> list[int]:
    """Ids of a processor's image/video placeholder and delimiter tokens ([] for a bare tokenizer)."""
    if not hasattr(processor, "image_processor"):
        return []
    ids = [v for k, v in _vision_settings(processor).items() if k.endswith(" id")]
    return sorted({i for i in ids if isinstance(i, int) and i >= 0})


VISION_TOKEN_TEXT = {"vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}


def _vision_settings(processor) -> dict:
    tok = processor.tokenizer
    out = {}
    for name in VISION_TOKENS:
        token = getattr(processor, name, None) or getattr(tok, name, None) or VISION_TOKEN_TEXT.get(name)
        token_id = tok.convert_tokens_to_ids(token) if isinstance(token, str) else token
        out[f"{name} id"] = None if token_id == tok.unk_token_id and tok.unk_token_id is not None else token_id
    ip = processor.image_processor
    size = getattr(ip, "size", None) or {}
    get = size.get if isinstance(size, dict) else lambda k, d=None: getattr(size, k, d)
    fallback = {"min_pixels": get("shortest_edge"), "max_pixels": get("longest_edge")}  # transformers 5 keeps them in size
    for k in VISION_SETTINGS:
        value = getattr(ip, k, None)
        out[f"image processor {k}"] = value if value is not None else fallback.get(k)
    return out


def preflight_processors(student_proc, teacher_proc, student_key="model.student", teacher_key="model.teacher"):
    """Stop before step 0 unless both processors turn an image into the same tokens and patches: the
    teacher must score the student's tokens against the very ``pixel_values`` the student saw."""
    s_img, t_img = hasattr(student_proc, "image_processor"), hasattr(teacher_proc, "image_processor")
    if s_img != t_img:
        which = student_key if s_img else teacher_key
        raise ValueError(f"preflight: only {which} takes images; distil a vision-language model from one")
    if not s_img:
        return
    s, t = _vision_settings(student_proc), _vision_settings(teacher_proc)
    for what in s:
        if s[what] != t[what]:
            raise ValueError(f"preflight: student and teacher disagree on the {what}: {student_key} has "
                             f"{s[what]!r}, {teacher_key} has {t[what]!r}. The teacher must see the student's "
                             "image tokens and patches unchanged.")
