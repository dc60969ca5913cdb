"""The rollout viewer's pages hold exactly the rollout they came from (HTML parsed, not string-matched): the policy's
tokens with their rewards, a tool episode's replies as unscored context, a vision row's image as the model saw it;
headless Chromium renders a page without script errors."""

from __future__ import annotations

import base64
import io
import json
import math
import sys
import types
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from PIL import Image

from src.callbacks.rollout_viewer import RolloutViewer, page_rows, render_page
from src.callbacks.seen_images import png_data_uri
from src.inspect_run import as_text
from src.inspect_run import main as inspect_main
from src.modules.models.tiny import build_tiny_vl_processor
from src.modules.models.tokenizer import build_char_tokenizer
from src.modules.rollout.batch import Rollout
from src.modules.rollout.tools import ToolRollout, _Episode
from src.train import train
from src.utils.headless_browser import find_chromium, screenshot

HEADER = {"step": 3, "phase": "exploration", "selection": "exploration", "floor": -1.0}
needs_chromium = pytest.mark.skipif(find_chromium() is None, reason="no Chromium on this machine (`make setup` "
                                    "installs Debian's chromium where apt-get can run as root; or set $CHROMIUM)")


class Page(HTMLParser):
    """A page's rows: per row, its token spans and tool replies in page order (``kind`` tok or tool), and its
    images."""

    def __init__(self, text: str):
        super().__init__()
        self.rows, self._item, self._label = [], None, False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = attrs.get("class", "").split()
        if tag == "div" and "data-row" in attrs:
            self.rows.append({"items": [], "images": []})
        elif tag == "img":
            self.rows[-1]["images"].append(attrs)
        elif tag == "span" and "tok" in classes:
            self._item = {**attrs, "kind": "tok", "text": ""}
        elif tag == "div" and "data-tool-reply" in attrs:
            self._item = {**attrs, "kind": "tool", "text": "", "label": ""}
        elif tag == "div" and "tool-label" in classes:
            self._label = True

    def handle_data(self, data):
        if self._item is not None:
            self._item["label" if self._label else "text"] += data

    def handle_endtag(self, tag):
        if tag == "div" and self._label:
            self._label = False
        elif tag in ("span", "div") and self._item is not None:
            self.rows[-1]["items"].append(self._item)
            self._item = None


def spans(row: dict) -> list[dict]:
    return [i for i in row["items"] if i["kind"] == "tok"]


def test_pages_match_their_rollouts_across_the_phase_switch(make_cfg, capsys):
    cfg = make_cfg("trainer.max_steps=4", "callbacks.phase_schedule.switch_step=2", "test=false",
                   "callbacks.rollout_viewer.every_n_steps=2", "callbacks.rollout_viewer.n_prompts=3",
                   "trainer.val_check_interval=100")  # no validation pages here
    _, obj = train(cfg)
    viewer = next(c for c in obj["trainer"].callbacks if isinstance(c, RolloutViewer))
    folder = Path(cfg.paths.output_dir) / "rollouts"
    assert sorted(p.name for p in folder.glob("*.html")) == ["index.html", "step_000000.html", "step_000002.html"]

    page = Page((folder / "step_000002.html").read_text())
    ro, tok = viewer.last_rollout, obj["module"].tokenizer
    floor = obj["module"].objective.clipping.floor
    assert len(page.rows) == 3
    for b, row in enumerate(page.rows):
        assert not row["images"] and all(i["kind"] == "tok" for i in row["items"])  # text rows, no tools
        positions = ro.response_mask_BT[b].nonzero().flatten().tolist()
        assert [s["text"] for s in spans(row)] == [tok.decode([int(ro.response_ids_BT[b, t])]) for t in positions]
        for span, t in zip(spans(row), positions):
            reward = float(ro.reward_BT[b, t])
            assert float(span["data-reward"]) == reward
            assert span["data-clipped"] == str(int(reward < floor))
            assert span["data-kept"] == str(int(bool(ro.loss_mask_BT[b, t])))
            assert ("dropped" in span["class"]) == (not bool(ro.loss_mask_BT[b, t]))
    text = (folder / "step_000002.html").read_text()
    assert "Rollouts at step 2 (refinement)" in text and "<script" not in text
    assert "Rollouts at step 0 (exploration)" in (folder / "step_000000.html").read_text()
    assert viewer.seconds > 0 and math.isfinite(viewer.seconds)
    assert "[rollout_viewer] 2 pages in" in capsys.readouterr().out  # what the pages cost, said at the end

    assert inspect_main([str(cfg.paths.output_dir), "--step", "2"]) == 0
    out = capsys.readouterr().out
    assert "step=2 phase=refinement selection=entropy" in out and "--- row 2:" in out


# ------------------------------------------------------------------------------------------- tool episodes

TURNS = ["<tool_call>2+2</tool_call><|im_end|>", "#### 4<|im_end|>"]
REPLY = "\n<|im_start|>user\n<tool_response>\n4\n</tool_response><|im_end|>\n<|im_start|>assistant\n"


def prepared(ro: Rollout, floor: float = -1.0) -> Rollout:
    """``ro`` with what ``objective.prepare`` adds, by hand: a reward per sampled token (falling from +1.5, so some
    fall under ``floor``), every other sampled token kept."""
    sampled = ro.response_mask_BT
    ro.reward_BT = torch.where(sampled, 1.5 - 0.25 * torch.arange(sampled.shape[1]).float(), 0.0)
    ro.advantage_BT = ro.reward_BT.clamp(min=floor)
    ro.teacher_logp_BT = torch.where(sampled, -0.5, 0.0)
    ro.loss_mask_BT = sampled & (torch.arange(sampled.shape[1]) % 2 == 0)
    ro.references = ["4"] * sampled.shape[0]
    return ro


def tool_rollout(tok) -> Rollout:
    """One episode as ``ToolRollout`` assembles it: a turn that calls the calculator, its reply (the chat template's
    glue around the tool message, not sampled), the final turn; and a second, shorter episode (padding after)."""
    ids = [tok(text, add_special_tokens=False)["input_ids"] for text in (*TURNS, REPLY)]
    prompt = tok("2+2?", add_special_tokens=False)["input_ids"]
    long, short = _Episode(prompt), _Episode(prompt)
    long.add(ids[0], True, [-0.1] * len(ids[0]), [0.3] * len(ids[0]))
    long.add(ids[2], False)
    long.add(ids[1], True, [-0.2] * len(ids[1]), [0.4] * len(ids[1]))
    short.add(ids[1], True, [-0.2] * len(ids[1]), [0.4] * len(ids[1]))
    prompt_BP = torch.tensor([prompt, prompt])
    return prepared(ToolRollout._assemble([long, short], prompt_BP, torch.ones_like(prompt_BP), tok.pad_token_id,
                                          False, 1, 0.0, {}))


def test_tool_replies_show_as_context_between_the_turns_and_are_not_scored(tmp_path):
    tok = build_char_tokenizer()
    ro = tool_rollout(tok)
    rows = page_rows(ro, tok, -1.0, 2)
    page = Page(render_page(rows, HEADER))
    long, short = page.rows

    turn1, turn2 = (tok(t, add_special_tokens=False)["input_ids"] for t in TURNS)
    assert [i["kind"] for i in long["items"]] == ["tok"] * len(turn1) + ["tool"] + ["tok"] * len(turn2)
    reply = long["items"][len(turn1)]
    assert reply["text"] == REPLY and "tool reply" in reply["label"] and "not scored" in reply["label"]
    assert "style" not in reply and "data-reward" not in reply  # no reward colour, no reward
    # the scored tokens are the sampled ones, in order, with their own rewards; the reply's tokens are none of them
    sampled = ro.response_mask_BT[0].nonzero().flatten().tolist()
    assert len(spans(long)) == len(sampled) == len(turn1) + len(turn2)
    assert [float(s["data-reward"]) for s in spans(long)] == [float(ro.reward_BT[0, t]) for t in sampled]
    assert "".join(s["text"] for s in spans(long)) == "".join(TURNS)
    assert [i["kind"] for i in short["items"]] == ["tok"] * len(turn2)  # no call, no reply; padding not shown
    assert rows[0]["tool_replies"] == [{"at": len(turn1), "text": REPLY}] and rows[1]["tool_replies"] == []

    # the saved page reads back as text with the reply in its place
    (tmp_path / "page.json").write_text(json.dumps({"header": HEADER, "rows": rows}))
    lines = as_text(tmp_path / "page.json").splitlines()
    assert lines[2 + len(turn1)] == f"[tool reply, not scored] {REPLY!r}"


# ------------------------------------------------------------------------------------------ vision rows

def digits_image() -> Image.Image:
    """An 84 x 28 picture (3 cells of 28 px, as the visual miniature draws): the processor keeps its size."""
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (28, 84, 3), dtype=np.uint8))


def decoded(uri: str) -> np.ndarray:
    head, data = uri.split(",", 1)
    assert head == "data:image/png;base64"
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))


def test_a_vision_row_shows_the_pixels_its_model_saw_and_a_text_row_none():
    processor = build_tiny_vl_processor(min_pixels=784, max_pixels=12544)
    image = digits_image()
    pixels = processor.image_processor(images=[image], return_tensors="pt")
    tok = processor.tokenizer
    answer = tok("#### 9<|im_end|>", add_special_tokens=False)["input_ids"]
    T = len(answer)
    ro = prepared(Rollout(
        input_ids=torch.tensor([[1, 2] + answer, [1, 2] + answer]), attention_mask=torch.ones(2, 2 + T),
        response_start=2, response_mask_BT=torch.ones(2, T, dtype=torch.bool), old_logp_BT=None, entropy_BT=None,
        truncated_B=torch.zeros(2, dtype=torch.bool),
        # row 0 has the image, row 1 none (the processor's layout: patches flat over the batch's images)
        model_kwargs={"pixel_values": pixels["pixel_values"], "image_grid_thw": pixels["image_grid_thw"],
                      "images_per_row": torch.tensor([1, 0])}))
    page = Page(render_page(page_rows(ro, tok, -1.0, 2, processor.image_processor), HEADER))
    with_image, without = page.rows
    assert len(with_image["images"]) == 1 and without["images"] == []
    np.testing.assert_array_equal(decoded(with_image["images"][0]["src"]), np.asarray(image))  # exactly its pixels
    assert len(spans(with_image)) == len(spans(without)) == T


def test_vision_pages_hold_the_first_rows_with_their_images(make_cfg, single_thread):
    cfg = make_cfg("experiment=visual_reasoning", "miniature=visual", "model=tiny_vl", "data.batch_size=4",
                   "data.train.n=8", "data.val.n=4", "rollout.max_new_tokens=4", "trainer.max_steps=1",
                   "trainer.val_check_interval=1", "test=false", "callbacks.rollout_viewer.every_n_steps=1",
                   "callbacks.rollout_viewer.n_prompts=2", "trainer.enable_progress_bar=false",
                   "callbacks.progress_bar=null", "callbacks.report=null", fast=False)
    _, obj = train(cfg)
    viewer = next(c for c in obj["trainer"].callbacks if isinstance(c, RolloutViewer))
    assert viewer.enabled, "the page failed (the viewer warned and stopped)"
    # only the page's rows are kept: 2 prompts with their own images, not the validation batch of 4
    assert viewer.batch["input_ids"].shape[0] == 2 and viewer.batch["model_kwargs"]["images_per_row"].tolist() == [1, 1]
    page = Page((Path(cfg.paths.output_dir) / "rollouts" / "step_000000.html").read_text())
    val = obj["datamodule"].splits["val"]
    assert len(page.rows) == 2
    for b, row in enumerate(page.rows):
        image = next(i["image"] for m in val.chats[b] for i in m["content"] if i.get("type") == "image")
        assert len(row["images"]) == 1
        np.testing.assert_array_equal(decoded(row["images"][0]["src"]), np.asarray(image.convert("RGB")))


# ------------------------------------------------------------------------------------- histograms, failures

def test_histograms_go_to_tensorboard_and_to_wandb(monkeypatch):
    written, logged = [], []

    class Histogram:  # wandb.Histogram's stand-in: wandb need not be installed
        def __init__(self, values):
            self.values = values

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(Histogram=Histogram))

    class Board(TensorBoardLogger):
        experiment = SimpleNamespace(add_histogram=lambda tag, values, step: written.append((tag, values, step)))

    class Wandb(WandbLogger):  # the real class, its run a stand-in (made without __init__, which needs wandb)
        experiment = SimpleNamespace(log=logged.append)

    ro = tool_rollout(build_char_tokenizer())
    trainer = SimpleNamespace(loggers=[Board.__new__(Board), Wandb.__new__(Wandb)], global_step=6)
    RolloutViewer._histograms(trainer, ro, step=3)

    sampled, kept = ro.response_mask_BT, ro.loss_mask_BT & ro.response_mask_BT
    want = {"rollouts/reward": ro.reward_BT[sampled], "rollouts/advantage": ro.advantage_BT[sampled],
            "rollouts/entropy_kept": ro.entropy_BT[kept], "rollouts/entropy_dropped": ro.entropy_BT[sampled & ~kept]}
    assert [(tag, step) for tag, _, step in written] == [(tag, 3) for tag in want]
    for tag, values, _ in written:
        torch.testing.assert_close(values, want[tag])  # the sampled tokens only: no tool reply, no padding
    (entry,) = logged
    assert entry.pop("trainer/global_step") == 3 and entry.keys() == want.keys()  # the step TensorBoard gets
    for tag, histogram in entry.items():
        np.testing.assert_array_equal(histogram.values, want[tag].numpy())


def test_a_failing_page_warns_once_and_the_run_goes_on():
    viewer = RolloutViewer(every_n_steps=1)

    def broken(trainer, pl_module, step):
        raise OSError("disk full")

    viewer.write_page = broken
    trainer, module = SimpleNamespace(global_step=1), SimpleNamespace(updates_per_rollout=1)
    with pytest.warns(UserWarning, match=r"no page at step 0 \(OSError: disk full\); no more pages"):
        viewer.on_train_batch_end(trainer, module, None, None, 0)
    assert not viewer.enabled
    trainer.global_step = 2
    viewer.on_train_batch_end(trainer, module, None, None, 1)  # silent: no more pages, no more warnings


# ------------------------------------------------------------------------------------------ in a browser

@needs_chromium
def test_headless_chromium_catches_a_script_error(tmp_path):
    """Not vacuous: the browser check below reads Chromium's console log, and does see an uncaught error."""
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><body><p>x</p><script>console.log('fine'); notDefined();</script></body>"
                    "</html>")
    rendered = screenshot(page, tmp_path / "broken.png", width=320, height=200)
    assert "fine" in rendered.console
    assert len(rendered.errors) == 1 and "notDefined" in rendered.errors[0]


@needs_chromium
def test_a_page_renders_in_headless_chromium_without_script_errors(tmp_path, capsys):
    tok = build_char_tokenizer()
    run = tmp_path / "run"
    (run / "rollouts").mkdir(parents=True)
    rows = page_rows(tool_rollout(tok), tok, -1.0, 2)
    rows[1]["images"] = [png_data_uri(digits_image())]
    (run / "rollouts" / "step_000003.html").write_text(render_page(rows, HEADER))
    (run / "rollouts" / "step_000003.json").write_text("{}")

    assert inspect_main([str(run), "--step", "3", "--screenshot", str(tmp_path / "page.png")]) == 0
    assert "step_000003.html ->" in capsys.readouterr().out
    shot = np.asarray(Image.open(tmp_path / "page.png").convert("RGB"))
    assert shot.shape == (960, 1280, 3)
    colours = np.unique(shot.reshape(-1, 3), axis=0)
    assert len(colours) > 50, f"a blank page: {len(colours)} colours"  # text, reward colours, the image
    greens = (shot[..., 1].astype(int) - shot[..., 0] > 40) & (shot[..., 1].astype(int) - shot[..., 2] > 40)
    assert greens.any(), "no token drawn in a reward's green"


# ------------------------------------------------------------- other teachers, validations, inspect_run's errors

def test_a_page_at_every_validation_and_the_teacher_prompts_of_self_distillation(make_cfg, single_thread):
    """Pages at the interval and after each validation (once per step); a self-distillation page's teacher reads
    its privileged prompt, so its rewards are the training's, not zero."""
    cfg = make_cfg("model.teacher=self", "data.teacher_context='The answer is {answer}.'", "trainer.max_steps=4",
                   "trainer.val_check_interval=2", "test=false", "callbacks.rollout_viewer.every_n_steps=5")
    _, obj = train(cfg)
    viewer = next(c for c in obj["trainer"].callbacks if isinstance(c, RolloutViewer))
    folder = Path(cfg.paths.output_dir) / "rollouts"
    assert sorted(p.name for p in folder.glob("step_*.html")) == ["step_000000.html", "step_000001.html",
                                                                  "step_000003.html"]
    assert "teacher_input_ids" in viewer.batch
    ro = viewer.last_rollout
    assert ro.teacher_prompt_ids is not None and ro.reward_BT[ro.response_mask_BT].abs().max() > 1e-3


def test_cross_vocabulary_pages_leave_the_tokens_without_a_reward_uncoloured(make_cfg, single_thread):
    # a BPE teacher over a character student: a teacher token covers several student tokens
    cfg = make_cfg("+model.teacher.tokenizer=bpe", "+model.teacher.cross_vocab=true", "trainer.max_steps=1",
                   "test=false", "trainer.val_check_interval=100", "callbacks.rollout_viewer.every_n_steps=1")
    _, obj = train(cfg)
    viewer = next(c for c in obj["trainer"].callbacks if isinstance(c, RolloutViewer))
    ro = viewer.last_rollout
    page = Page((Path(cfg.paths.output_dir) / "rollouts" / "step_000000.html").read_text())
    for b, row in enumerate(page.rows):
        positions = ro.response_mask_BT[b].nonzero().flatten().tolist()
        scored = [s["data-scored"] == "1" for s in spans(row)]
        assert scored == [bool(ro.scored_mask_BT[b, t]) for t in positions]
        assert all("background:none" in s["style"] for s, ok in zip(spans(row), scored) if not ok)
    assert not all(ro.scored_mask_BT[ro.response_mask_BT].tolist())  # spans of several student tokens


def test_inspect_run_names_a_missing_folder_and_an_empty_one(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        inspect_main([str(tmp_path / "nope")])
    (tmp_path / "run" / "rollouts").mkdir(parents=True)
    with pytest.raises(SystemExit, match="holds no page yet"):
        inspect_main([str(tmp_path / "run")])
    with pytest.raises(SystemExit, match="give the run's output folder above it"):
        inspect_main([str(tmp_path / "run" / "rollouts")])
