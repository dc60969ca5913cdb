"""The images a vision-language row's model saw, rebuilt from its batch's ``pixel_values`` (the rollout pages show them).

A Qwen2-VL / Qwen2.5-VL image processor resizes an image to whole merged patches, rescales and normalises it, and
lays image i out as ``prod(image_grid_thw[i])`` rows of ``C * temporal_patch * patch * patch`` values: the patches
in merge windows (each ``merge x merge`` block of patches together, blocks row by row), each patch flattened as
channel, frame, row, column (``Qwen2VLImageProcessor``; the vision tower's patch embedding reads that order, so it is
fixed by the model). ``row_images`` inverts the layout for one row's images and undoes the normalisation: the first
frame as 8-bit RGB, exactly the pixels the model read (so after the resize, not the file as stored).
"""

from __future__ import annotations

import base64
import io

import torch
from PIL import Image

from src.modules.models.multimodal import has_images, kwargs_of_rows


def row_images(model_kwargs: dict, row: int, image_processor) -> list[Image.Image]:
    """The images of row ``row`` of a batch's ``model_kwargs`` ([] for a text batch), as the model saw them."""
    if not has_images(model_kwargs):
        return []
    B = model_kwargs["images_per_row"].shape[0]
    own = kwargs_of_rows(model_kwargs, torch.tensor([row]), B)
    if "image_grid_thw" not in own:
        return []  # a row without images in a batch with some
    ip = image_processor
    patch, merge, frames = ip.patch_size, ip.merge_size, ip.temporal_patch_size
    mean = torch.tensor(ip.image_mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(ip.image_std, dtype=torch.float32).view(-1, 1, 1)
    images, first = [], 0
    for t, h, w in own["image_grid_thw"].tolist():
        pixels = own["pixel_values"][first : first + t * h * w].float().cpu()
        first += t * h * w
        C = pixels.shape[1] // (frames * patch * patch)
        grid = pixels.reshape(t, h // merge, w // merge, merge, merge, C, frames, patch, patch)
        # -> [t, frames, C, h // merge, merge, patch, w // merge, merge, patch]: frames of C x (h * patch) x (w * patch)
        frame = grid.permute(0, 6, 5, 1, 3, 7, 2, 4, 8).reshape(t * frames, C, h * patch, w * patch)[0]
        if ip.do_normalize:
            frame = frame * std + mean
        scale = 1.0 / ip.rescale_factor if ip.do_rescale else 1.0
        rgb = (frame * scale).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        images.append(Image.fromarray(rgb.squeeze(-1) if C == 1 else rgb))
    return images


def png_data_uri(image: Image.Image, max_side: int = 320) -> str:
    """``image`` as a ``data:image/png;base64,...`` URI, shrunk to ``max_side`` pixels at most (a page stays small
    and self-contained)."""
    image = image.copy()
    image.thumbnail((max_side, max_side))
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode("ascii")
