"""The rollout viewer's pages hold exactly the rollout they came from (HTML parsed, not string-matched)."""

from __future__ import annotations

import math
from html.parser import HTMLParser
from pathlib import Path

from src.callbacks.rollout_viewer import RolloutViewer
from src.inspect_run import main as inspect_main
from src.train import train


class Tokens(HTMLParser):
    """The token spans of a page, per row: text and data attributes."""

    def __init__(self):
        super().__init__()
        self.rows, self._span = [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "div" and "data-row" in attrs:
            self.rows.append([])
        if tag == "span" and "tok" in attrs.get("class", ""):
            self._span = {**attrs, "text": ""}

    def handle_data(self, data):
        if self._span is not None:
            self._span["text"] += data

    def handle_endtag(self, tag):
        if tag == "span" and self._span is not None:
            self.rows[-1].append(self._span)
            self._span = None


def test_pages_match_their_rollouts_across_the_phase_switch(make_cfg, capsys):
    cfg = make_cfg("trainer.max_steps=4", "callbacks.phase_schedule.switch_step=2", "test=false",
                   "callbacks.rollout_viewer.every_n_steps=2", "callbacks.rollout_viewer.n_prompts=3")
    _, obj = train(cfg)
    viewer = next(c for c in obj["trainer"].callbacks if isinstance(c, RolloutViewer))
    folder = Path(cfg.paths.output_dir) / "rollouts"
    assert sorted(p.name for p in folder.glob("*.html")) == ["index.html", "step_000000.html", "step_000002.html"]

    page = Tokens()
    page.feed((folder / "step_000002.html").read_text())
    ro, tok = viewer.last_rollout, obj["module"].tokenizer
    floor = obj["module"].objective.clipping.floor
    assert len(page.rows) == 3
    for b, spans in enumerate(page.rows):
        positions = ro.response_mask_BT[b].nonzero().flatten().tolist()
        assert [s["text"] for s in spans] == [tok.decode([int(ro.response_ids_BT[b, t])]) for t in positions]
        for span, t in zip(spans, positions):
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
