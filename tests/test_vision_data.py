"""Vision-language data: the file layouts and image forms load and verify, bad images are named by file,
line and path; the synthetic visual task is right, deterministic and split-disjoint; batches from a tiny
Qwen2.5-VL processor match the images, the row helpers match collating the rows alone, and a tiny
Qwen2.5-VL runs forward and generate on a batch."""

from __future__ import annotations

import base64
import io
import json
import logging
import sys
import types
from pathlib import Path

import hydra
import pytest
import torch
from PIL import Image

from src.datamodules.rows import DataRowError
from src.datamodules.vision import VisionPromptDataModule, VisionPrompts
from src.datamodules.visual_task import QUESTION, VisualTask, sum_steps
from src.modules.models.multimodal import model_inputs, repeat_vision_kwargs, split_vision_kwargs
from src.modules.models.tiny import build_tiny_vl_processor


def png(path: Path, size=(56, 56), colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def png_bytes(size=(56, 56), colour=(30, 200, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def items(row: dict, kind: str) -> list:
    return [i for m in row["prompt"] for i in m["content"] if i["type"] == kind]


def pixels(image) -> bytes:
    image = image if isinstance(image, Image.Image) else Image.open(image)
    return image.convert("RGB").tobytes()


@pytest.fixture(scope="module")
def processor():
    return build_tiny_vl_processor(min_pixels=56 * 56, max_pixels=112 * 112)


# ------------------------------------------------------------------------------------------------ formats

def test_geometry3k_layout_with_relative_paths(tmp_path):
    png(tmp_path / "imgs" / "a.png")
    png(tmp_path / "imgs" / "b.png", colour=(0, 0, 255))
    path = write_jsonl(tmp_path / "data" / "geo.jsonl", [
        {"problem": "<image>Find x.", "images": ["../imgs/a.png"], "answer": "3"},
        {"problem": "Compare <image> with <image> now", "answer": 2.0, "id": "q2",
         "images": ["../imgs/a.png", str(tmp_path / "imgs/b.png")]},
    ])
    rows = VisionPrompts(str(path))()
    assert [(r["id"], r["answer"]) for r in rows] == [(1, "3"), ("q2", "2")]
    assert rows[0]["prompt"] == [{"role": "user", "content": [
        {"type": "image", "image": str((tmp_path / "imgs" / "a.png").resolve())},
        {"type": "text", "text": "Find x."}]}]
    content = rows[1]["prompt"][0]["content"]  # images where the placeholders were, in order
    assert [i["type"] for i in content] == ["text", "image", "text", "image", "text"]
    assert Path(content[3]["image"]).name == "b.png"
    # image_root replaces the data file's folder
    png(tmp_path / "alt" / "imgs" / "a.png")
    rows = VisionPrompts(str(path), image_root=str(tmp_path / "alt" / "x"), limit=1)()
    assert items(rows[0], "image")[0]["image"] == str((tmp_path / "alt" / "imgs" / "a.png").resolve())


def test_mathvista_layout_letters_multiple_choice(tmp_path):
    png(tmp_path / "images" / "1.png")
    path = write_jsonl(tmp_path / "testmini.jsonl", [
        {"pid": "1", "question": "Which is larger?", "image": "images/1.png", "choices": ["3", "5", "7"],
         "answer": "5", "query": "Hint: ...", "question_type": "multi_choice"},
        {"pid": "2", "question": "How many?", "image": "images/1.png", "choices": None, "answer": "4"},
        {"pid": "3", "question": "Pick", "image": "images/1.png", "choices": ["x", "y"], "answer": "b"},
    ])
    rows = VisionPrompts(str(path))()
    assert [(r["id"], r["answer"]) for r in rows] == [("1", "B"), ("2", "4"), ("3", "B")]
    assert items(rows[0], "text")[0]["text"] == "Which is larger?\nChoices:\n(A) 3\n(B) 5\n(C) 7"
    assert items(rows[1], "text")[0]["text"] == "How many?"
    # no placeholder: the image comes first
    assert [i["type"] for i in rows[0]["prompt"][0]["content"]] == ["image", "text"]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "image": "images/1.png", "choices": ["a"],
                                                "answer": "z"}])
    with pytest.raises(DataRowError, match=r"bad.jsonl:1: answer 'z' is none of the choices"):
        VisionPrompts(str(bad))()


def test_messages_and_llava_layouts(tmp_path):
    png(tmp_path / "a.png")
    png(tmp_path / "b.png", size=(84, 56))
    path = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": [{"type": "image", "image": "a.png", "max_pixels": 3136},
                                                   {"type": "image"}, {"type": "text", "text": "Same?"}]},
                      {"role": "assistant", "content": "no"}],
         "images": ["b.png"]},
        {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nColour?"},
                                             {"from": "gpt", "value": "red"}]},
        {"messages": [{"role": "user", "content": [{"type": "image", "image": f"file://{tmp_path}/b.png"},
                                                   {"type": "text", "text": "W?"}]}], "answer": 84},
    ])
    rows = VisionPrompts(str(path))()
    assert [r["answer"] for r in rows] == ["no", "red", "84"]
    chat = rows[0]["prompt"]
    assert [m["role"] for m in chat] == ["system", "user"]  # the reply became the answer
    assert chat[1]["content"][0] == {"max_pixels": 3136, "type": "image", "image": str(tmp_path / "a.png")}
    assert chat[1]["content"][1]["image"] == str(tmp_path / "b.png")  # the bare item took images[0]
    assert rows[1]["prompt"] == [{"role": "user", "content": [
        {"type": "image", "image": str(tmp_path / "a.png")}, {"type": "text", "text": "Colour?"}]}]
    assert items(rows[2], "image")[0]["image"] == str(tmp_path / "b.png")


def test_parquet_bytes_and_base64_images(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    data = png_bytes(colour=(1, 2, 3))
    table = pa.table({"problem": ["<image>What colour?", "<image><image>Two"],
                      "images": [[{"bytes": data, "path": "x.png"}],
                                 [{"bytes": data, "path": None}, {"bytes": None, "path": "rel.png"}]],
                      "answer": ["dark", "2"]})
    png(tmp_path / "rel.png", colour=(9, 9, 9))
    pq.write_table(table, tmp_path / "geo.parquet")
    rows = VisionPrompts(str(tmp_path / "geo.parquet"))()
    assert [r["id"] for r in rows] == [0, 1]  # row index outside JSONL
    first = items(rows[0], "image")[0]["image"]
    assert isinstance(first, Image.Image) and pixels(first) == pixels(Image.open(io.BytesIO(data)))
    assert items(rows[1], "image")[1]["image"] == str(tmp_path / "rel.png")  # bytes None: the path is used

    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    path = write_jsonl(tmp_path / "b64.jsonl", [{"question": "q", "image": uri, "answer": "1"}])
    image = items(VisionPrompts(str(path))()[0], "image")[0]["image"]
    assert isinstance(image, Image.Image) and image.size == (56, 56)


def test_datasets_rows_with_pil_images(tmp_path, monkeypatch):
    calls = []

    def load_dataset(name, subset=None, split=None, data_files=None):
        calls.append((name, subset, split))
        return [{"question": "q", "decoded_image": Image.new("RGB", (56, 56)), "image": "images/1.jpg",
                 "answer": "7"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    rows = VisionPrompts(dataset="AI4Math/MathVista", split="testmini")()
    assert calls == [("AI4Math/MathVista", None, "testmini")]
    assert isinstance(items(rows[0], "image")[0]["image"], Image.Image)  # decoded_image wins over the path


def broken_images(tmp_path) -> Path:
    png(tmp_path / "ok.png")
    truncated = png_bytes(size=(64, 64))
    (tmp_path / "truncated.png").write_bytes(truncated[: len(truncated) // 2])
    (tmp_path / "text.png").write_text("not an image")
    return write_jsonl(tmp_path / "x.jsonl", [
        {"problem": "<image>a", "images": ["ok.png"], "answer": "1"},
        {"problem": "<image>b", "images": ["missing.png"], "answer": "2"},
        {"problem": "<image>c", "images": ["ok.png"], "answer": "3"},
        {"problem": "<image><image>d", "images": ["truncated.png", "text.png"], "answer": "4"},
        {"problem": "<image><image>e", "images": ["ok.png"], "answer": "5"},
        {"problem": "<image>f", "image": "https://example.com/a.png", "answer": "6"},
    ])


def test_bad_images_are_listed_by_file_line_and_path(tmp_path):
    path = broken_images(tmp_path)
    with pytest.raises(DataRowError) as err:
        VisionPrompts(str(path))()
    msg = str(err.value)
    assert "4 of 6 rows are malformed" in msg
    assert f"{path}:2: image 'missing.png' ({tmp_path / 'missing.png'}): no such file" in msg
    assert f"{path}:4: image 'truncated.png'" in msg and "'text.png'" in msg and "unreadable" in msg
    assert f"{path}:5: 2 image placeholders but 1 images" in msg
    assert f"{path}:6: image 'https://example.com/a.png': remote images are not fetched" in msg
    assert f"{path}:1:" not in msg and f"{path}:3:" not in msg


def test_skip_mode_warns_for_each_bad_row(tmp_path, caplog):
    path = broken_images(tmp_path)
    with caplog.at_level(logging.WARNING, logger="src.datamodules.rows"):
        rows = VisionPrompts(str(path), on_error="skip")()
    assert [r["answer"] for r in rows] == ["1", "3"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for line in (2, 4, 5, 6):
        assert sum(f"{path}:{line}:" in w for w in warnings) == 1
    assert "skipped 4 of 6 rows" in warnings[-1]


# ------------------------------------------------------------------------------------------ synthetic task

def test_visual_task_answers_and_steps_follow_the_digits():
    rows = VisualTask("train", n=40, n_digits=3, seed=1)()
    for row in rows:
        d = row["digits"]
        assert row["answer"] == str(sum(d)) and row["solution"].endswith(f"#### {sum(d)}")
        steps = row["solution"].split("\n")[:-1]
        assert len(steps) == 2 and steps[0] == f"{d[0]}+{d[1]}={d[0] + d[1]}"
        assert items(row, "text")[0]["text"] == QUESTION
        image = items(row, "image")[0]["image"]
        assert image.size == (56, 56)
        gray = image.convert("L")
        for k in range(3):  # each digit is drawn, dark, inside its own strip
            strip = gray.crop((k * 18, 0, (k + 1) * 18, 56))
            assert min(strip.getdata()) < 120
    assert sum_steps([7]) == "#### 7" and sum_steps([9, 9, 9, 9]) == "9+9=18\n18+9=27\n27+9=36\n#### 36"
    assert len({tuple(r["digits"]) for r in rows}) == 40  # distinct while the split has sequences left


def test_visual_task_is_deterministic_and_splits_are_disjoint():
    def seqs(split, n, seed=0):
        return {"".join(map(str, r["digits"])) for r in VisualTask(split, n=n, n_digits=3, seed=seed)()}

    a, b = VisualTask("val", n=8, seed=3)(), VisualTask("val", n=8, seed=3)()
    assert [r["digits"] for r in a] == [r["digits"] for r in b]
    def images(rows):
        return [pixels(items(r, "image")[0]["image"]) for r in rows]

    assert images(a) == images(b)
    c = VisualTask("val", n=8, seed=4)()
    assert [r["digits"] for r in a] != [r["digits"] for r in c]
    train, val, test = seqs("train", 900), seqs("val", 300), seqs("test", 300)
    assert len(train) > 700 and 50 < len(val) < 200 and 50 < len(test) < 200  # every sequence of each split
    assert not (train & val) and not (train & test) and not (val & test)
    assert seqs("test", 300, seed=7) == test  # the split of a sequence does not depend on the seed
    with pytest.raises(ValueError, match="do not fit"):
        VisualTask("train", n=1, n_digits=6, image_size=28, font_size=20)()


def test_visual_task_row_of_cells_keeps_each_glyph_near_its_cells_centre():
    # the miniature's layout: one 28 px cell (one merged image token) per digit, glyphs jittered <= 2 px
    rows = VisualTask("train", n=30, n_digits=3, cell_size=28, jitter=2, seed=2)()
    centres = []
    for row in rows:
        image = items(row, "image")[0]["image"].convert("L")
        assert image.size == (84, 28)
        for k in range(3):
            cell = image.crop((k * 28, 0, (k + 1) * 28, 28))
            ink = [(i % 28, i // 28) for i, v in enumerate(cell.getdata()) if v < 120]
            assert ink, f"no glyph in cell {k}"
            xs, ys = [x for x, _ in ink], [y for _, y in ink]
            centres.append(((min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2))
    # every glyph sits within jitter (+ a pixel of glyph asymmetry and rounding) of the centre, and they do move
    assert all(abs(x - 13.5) <= 4 and abs(y - 13.5) <= 4 for x, y in centres)
    assert len({round(x) for x, _ in centres}) > 1
    with pytest.raises(ValueError, match="jitter"):
        VisualTask("train", n=1, jitter=-1)
    with pytest.raises(ValueError, match="cell_size"):
        VisualTask("train", n=1, cell_size=4)


def test_noisy_demonstrations_misread_a_share_of_the_rows_and_keep_the_true_answer():
    clean = VisualTask("train", n=600, n_digits=3, cell_size=28, seed=0)()
    noisy = VisualTask("train", n=600, n_digits=3, cell_size=28, seed=0, misread={8: 3, 9: 4}, misread_share=0.6)()
    misread = 0
    for a, b in zip(clean, noisy):
        assert a["digits"] == b["digits"] and a["answer"] == b["answer"] == str(sum(a["digits"]))
        assert pixels(items(a, "image")[0]["image"]) == pixels(items(b, "image")[0]["image"])  # same images
        shown = [{8: 3, 9: 4}.get(d, d) for d in a["digits"]]
        if not {8, 9} & set(a["digits"]):
            assert b["solution"] == a["solution"]
        elif b["solution"] == a["solution"]:
            continue  # read right
        else:
            assert b["solution"] == sum_steps(shown) and b["solution"] != a["solution"]
            misread += 1
    showing = sum(bool({8, 9} & set(r["digits"])) for r in clean)
    assert 0.5 < misread / showing < 0.7  # about misread_share of the rows that show an 8 or a 9
    # a sequence is read the same way wherever it comes round
    again = VisualTask("train", n=1200, n_digits=3, cell_size=28, seed=0, misread={8: 3, 9: 4}, misread_share=0.6)()
    solution = {}
    for row in again:
        assert solution.setdefault(tuple(row["digits"]), row["solution"]) == row["solution"]
    with pytest.raises(ValueError, match="misread maps a digit"):
        VisualTask("train", n=1, misread={8: 8})
    with pytest.raises(ValueError, match="misread_share"):
        VisualTask("train", n=1, misread={8: 3}, misread_share=1.5)


def test_visual_task_saved_folder_reads_back(tmp_path):
    task = VisualTask("test", n=6, n_digits=2, image_size=56, distractors=3)
    path = task.save(tmp_path / "visual")
    rows, back = task(), VisionPrompts(str(path))()
    assert [r["id"] for r in back] == [r["id"] for r in rows]
    assert [(r["answer"], r["solution"]) for r in back] == [(r["answer"], r["solution"]) for r in rows]
    for r, b in zip(rows, back):
        assert pixels(items(b, "image")[0]["image"]) == pixels(items(r, "image")[0]["image"])
        assert items(b, "text") == items(r, "text")


# ------------------------------------------------------------------------------------------------ batches

def mixed_rows(tmp_path) -> list[dict]:
    """Rows with 1, 2, 0 and 1 images of different sizes, one with its own pixel budget."""
    png(tmp_path / "a.png")
    png(tmp_path / "b.png", size=(84, 56), colour=(0, 90, 0))
    png(tmp_path / "big.png", size=(112, 112), colour=(0, 0, 90))
    path = write_jsonl(tmp_path / "rows.jsonl", [
        {"problem": "<image>one", "images": ["a.png"], "answer": "1"},
        {"problem": "<image> and <image>, two", "images": ["b.png", "a.png"], "answer": "2",
         "solution": "s2"},
        {"messages": [{"role": "user", "content": "no image"}], "answer": "0"},
        {"problem": "<image>big", "images": ["big.png"], "answer": "3", "max_pixels": 3136},
    ])
    return VisionPrompts(str(path))()


def datamodule(rows, processor, **kwargs) -> VisionPromptDataModule:
    dm = VisionPromptDataModule(lambda: rows, batch_size=2, **kwargs)
    dm.set_processor(processor)
    dm.setup("fit")
    return dm


def test_collated_batch_matches_the_images(tmp_path, processor):
    dm = datamodule(mixed_rows(tmp_path), processor)
    data = dm.splits["train"]
    batch = dm.collate([data[i] for i in range(4)])
    mk = batch["model_kwargs"]
    assert mk["images_per_row"].tolist() == [1, 2, 0, 1]
    # 14px patches, 2x2 merge: 56x56 -> 4x4 patches; 84 wide -> 4x6; 112x112 capped to 56x56 by its row
    assert mk["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 6], [1, 4, 4], [1, 4, 4]]
    assert mk["pixel_values"].shape == (16 + 24 + 16 + 16, 3 * 2 * 14 * 14)
    pad_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert (batch["input_ids"] == pad_id).sum(1).tolist() == [4, 6 + 4, 0, 4]
    assert torch.equal(mk["mm_token_type_ids"].bool(), batch["input_ids"] == pad_id)
    mask = batch["attention_mask"]
    assert mask[:, -1].all() and (mask.cummax(1).values == mask).all()  # left padded
    ref = processor.image_processor(images=[Image.open(tmp_path / "b.png")], return_tensors="pt")
    assert torch.allclose(mk["pixel_values"][16:40], ref["pixel_values"])  # image 2 = rows 16..39
    assert batch["references"] == ["1", "2", "0", "3"] and batch["ids"] == [1, 2, 3, 4]
    assert "target_ids" not in batch  # only some rows have a solution
    for i in range(4):  # the setup-time length check counts exactly what collating produces
        assert dm.prompt_tokens(data[i][0]) == int(dm.collate([data[i]])["attention_mask"].sum())


def test_max_prompt_tokens_counts_image_tokens(tmp_path, processor):
    rows = mixed_rows(tmp_path)[:2]
    longest = max(int(datamodule(rows, processor).collate([x])["attention_mask"].sum())
                  for x in datamodule(rows, processor).splits["train"])
    datamodule(rows, processor, max_prompt_tokens=longest)
    with pytest.raises(ValueError, match="row 2: prompt has .* tokens"):
        datamodule(rows, processor, max_prompt_tokens=longest - 1)


def test_longest_prompts_count_image_tokens(tmp_path, processor):
    """What the module's position check reads (``_check_positions``): the longest prompt with its images expanded."""
    dm = datamodule(mixed_rows(tmp_path), processor)
    lengths = {x[3]: int(dm.collate([x])["attention_mask"].sum()) for x in dm.splits["train"]}
    longest = max(lengths, key=lengths.get)
    assert dm.longest_prompts() == {"train": (lengths[longest], longest)}
    assert dm.longest_teacher_prompts() == {}


def test_defaults_instruction_and_a_bare_tokenizer(tmp_path, processor):
    rows = mixed_rows(tmp_path)
    dm = datamodule(rows, processor, min_pixels=112 * 112, max_pixels=112 * 112, instruction="Box it.")
    chat = dm.splits["train"][0][0]
    assert chat[0]["content"][0]["min_pixels"] == 112 * 112
    assert chat[0]["content"][-1]["text"] == "one\nBox it."
    assert dm.splits["train"][3][0][0]["content"][0]["max_pixels"] == 3136  # the row's own budget wins
    grid = dm.collate([dm.splits["train"][0]])["model_kwargs"]["image_grid_thw"]
    assert grid.tolist() == [[1, 8, 8]]  # upscaled to the module's minimum
    assert "min_pixels" not in items(rows[0], "image")[0]  # the source rows are not modified
    with pytest.raises(TypeError, match="processor"):
        VisionPromptDataModule(lambda: rows).set_tokenizer(processor.tokenizer)


def test_select_and_repeat_match_collating_the_rows_alone(tmp_path, processor):
    dm = datamodule(mixed_rows(tmp_path), processor)
    data = dm.splits["train"]
    mk = dm.collate([data[i] for i in range(4)])["model_kwargs"]
    for idx in ([1], [3, 1], [2], [1, 0, 1], [2, 3, 0]):
        alone = dm.collate([data[i] for i in idx])["model_kwargs"]
        picked = split_vision_kwargs(mk, idx)
        assert picked.keys() == alone.keys()  # no image, no pixel_values: as the processor does
        for key in set(alone) - {"mm_token_type_ids"}:
            assert torch.equal(picked[key], alone[key]), (idx, key)
        P = alone["mm_token_type_ids"].shape[1]  # left padded: the same rows end alike
        assert torch.equal(picked["mm_token_type_ids"][:, -P:], alone["mm_token_type_ids"])
    rep = repeat_vision_kwargs(mk, 3)
    same = split_vision_kwargs(mk, [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    assert all(torch.equal(rep[k], same[k]) for k in mk)
    assert rep["pixel_values"].shape[0] == 3 * mk["pixel_values"].shape[0]
    assert torch.equal(rep["pixel_values"][16:32], mk["pixel_values"][:16])  # row 0's patches, second copy
    broken = {**mk, "images_per_row": torch.tensor([1, 1, 0, 1])}
    with pytest.raises(ValueError, match="inconsistent vision kwargs"):
        split_vision_kwargs(broken, [0])
    stripped = model_inputs(mk, seq_len=mk["mm_token_type_ids"].shape[1] + 5)
    assert "images_per_row" not in stripped and stripped["mm_token_type_ids"][:, -5:].eq(0).all()


def tiny_vl_model(processor):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok = processor.tokenizer
    ids = {k: tok.convert_tokens_to_ids(f"<|{k}|>")
           for k in ("image_pad", "video_pad", "vision_start", "vision_end")}
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, tie_word_embeddings=True,
                bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                  fullatt_block_indexes=[0])
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["image_pad"],
                           video_token_id=ids["video_pad"], vision_start_token_id=ids["vision_start"],
                           vision_end_token_id=ids["vision_end"], bos_token_id=None,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(cfg).eval()


@torch.no_grad()
def test_tiny_qwen2_5_vl_forward_and_generate(tmp_path, processor):
    torch.set_num_threads(1)
    rows = VisualTask("train", n=3, n_digits=2, image_size=56)() + mixed_rows(tmp_path)[:2]
    dm = datamodule(rows, processor)
    batch = dm.collate([dm.splits["train"][i] for i in range(5)])
    ids, mask, mk = batch["input_ids"], batch["attention_mask"], batch["model_kwargs"]
    model = tiny_vl_model(processor)
    logits = model(input_ids=ids, attention_mask=mask, **model_inputs(mk)).logits
    assert logits.shape == (*ids.shape, len(processor.tokenizer)) and torch.isfinite(logits).all()
    # the image reaches the logits: another picture, another prediction
    other = {**mk, "pixel_values": mk["pixel_values"].flip(0)}
    assert not torch.allclose(model(input_ids=ids, attention_mask=mask, **model_inputs(other)).logits[:, -1],
                              logits[:, -1])
    # the rows picked with the helper score exactly as inside the full batch
    idx = [4, 0]
    picked = model_inputs(split_vision_kwargs(mk, idx))
    sub = model(input_ids=ids[idx], attention_mask=mask[idx], **picked).logits
    assert torch.allclose(sub[:, -1], logits[idx, -1], atol=1e-5)
    # generate: G copies of each prompt, greedy, agree with each other and with the unrepeated batch
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    seq = model.generate(input_ids=ids, attention_mask=mask, **model_inputs(mk), **gen)
    seq2 = model.generate(input_ids=ids.repeat_interleave(2, 0), attention_mask=mask.repeat_interleave(2, 0),
                          **model_inputs(repeat_vision_kwargs(mk, 2)), **gen)
    assert seq.shape == (5, ids.shape[1] + 4) and torch.equal(seq2[::2], seq) and torch.equal(seq2[1::2], seq)
    # scoring prompt + response: mm_token_type_ids padded with text to the longer sequence
    full_mask = torch.cat([mask, torch.ones_like(seq[:, ids.shape[1]:])], 1)
    scored = model(input_ids=seq, attention_mask=full_mask, **model_inputs(mk, seq_len=seq.shape[1])).logits
    assert torch.allclose(scored[:, ids.shape[1] - 1], logits[:, -1], atol=1e-5)
    assert torch.equal(scored[:, ids.shape[1] - 1:-1].argmax(-1), seq[:, ids.shape[1]:])


def test_tiny_processor_saves_and_reloads(tmp_path, processor):
    from transformers import AutoProcessor

    processor.save_pretrained(tmp_path)
    back = AutoProcessor.from_pretrained(tmp_path)
    chat = [{"role": "user", "content": [{"type": "image", "image": "x"},
                                         {"type": "text", "text": "1 + 2\n"}]}]
    text = processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>1 + 2\n<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert back.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == text
    assert back.tokenizer(text)["input_ids"] == processor.tokenizer(text)["input_ids"]
    assert back.tokenizer.decode(back.tokenizer(text)["input_ids"]) == text


# ------------------------------------------------------------------------------------------------ configs

def test_visual_configs_compose_and_batch(make_cfg, tmp_path, processor):
    cfg = make_cfg("data=visual_mini", "data.batch_size=4", "data.train.n=16", "data.val.n=4",
                   "data.test.n=4")
    dm = hydra.utils.instantiate(cfg.data)
    dm.set_tokenizer(build_tiny_vl_processor(min_pixels=784))  # the miniature models' pixel budget
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 4
    # an 84 x 28 row of three 28 px cells: 2 x 6 patches of 14 px, one merged image token per digit
    assert batch["model_kwargs"]["image_grid_thw"].tolist() == [[1, 2, 6]] * 4
    n_image = (batch["input_ids"] == dm.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum(1)
    assert n_image.tolist() == [3] * 4
    assert len(batch["target_ids"]) == 4 and len(next(iter(dm.val_dataloader()))["ids"]) == 4

    path = VisualTask("test", n=4, n_digits=2).save(tmp_path / "files")
    cfg = make_cfg("data=visual_jsonl", f"data.train.path={path}", f"data.test.path={path}",
                   "data.batch_size=2", fast=False)
    dm = hydra.utils.instantiate(cfg.data)
    dm.set_processor(processor)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["model_kwargs"]["images_per_row"].tolist() == [1, 1]
    assert len(dm.splits["val"]) == 4 and dm.instruction.endswith("\\boxed{}.")
