"""The main job's summary: teacher, student before and student after, on the test split.

Before training it evaluates the teacher and the student (greedy decoding, graded answers); after
training the student again. It prints one table (accuracy, mean response length, generated tokens
per second; for tool-use episodes also tool calls per episode, the malformed call rate, turns per episode
and the truncation rate) and writes it to ``<output_dir>/report.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from lightning import Callback
from lightning.pytorch.utilities import rank_zero_only

from src.modules.rollout.tools import episode_totals

# a tool-use evaluation's extra columns: (row key, header, format)
TOOL_COLUMNS = (("calls_per_episode", "tool calls/episode", "{:.2f}"), ("malformed_rate", "malformed", "{:.1%}"),
                ("turns", "turns", "{:.2f}"), ("truncation_rate", "truncated", "{:.1%}"))


@torch.no_grad()
def greedy_eval(pl_module, dataloader, policy) -> dict[str, float]:
    """Accuracy, mean response length and generated tokens/s of ``policy`` on ``dataloader``; with a tool
    rollout also tool calls per episode, malformed calls per call, turns per episode and truncation rate."""
    correct = n = tokens = truncated = 0
    seconds = 0.0
    tools = None
    for batch in dataloader:
        batch = {k: v.to(pl_module.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        start = time.perf_counter()
        ro = pl_module.sampler(policy, batch, greedy=True)
        seconds += time.perf_counter() - start
        correct += int(pl_module.evaluator.grade(ro).sum())
        n += len(ro.references)
        tokens += int(ro.response_mask_BT.sum())
        truncated += int(ro.truncated_B.sum())
        totals = episode_totals(ro)
        if totals is not None:
            tools = {k: (tools or {}).get(k, 0) + v for k, v in totals.items()}
    out = {"acc": correct / max(n, 1), "response_len": tokens / max(n, 1), "tokens_per_s": tokens / max(seconds, 1e-9),
           "n": n}
    if tools is not None:
        out.update(calls_per_episode=tools["calls"] / max(tools["episodes"], 1),
                   malformed_rate=tools["malformed"] / max(tools["calls"], 1),
                   turns=tools["turns"] / max(tools["episodes"], 1), truncation_rate=truncated / max(n, 1))
    return out


class DistillationReport(Callback):
    """
    Args:
        split: ``test`` or ``val``: which datamodule split to evaluate.
        filename: where the table goes, under the run's output folder.
    """

    def __init__(self, split: str = "test", output_dir: str | None = None, filename: str = "report.json"):
        self.split, self.output_dir, self.filename = split, output_dir, filename
        self.rows: dict[str, dict[str, float]] = {}

    def _loader(self, trainer):
        dm = trainer.datamodule
        dm.setup("test")
        return dm.test_dataloader() if self.split == "test" else dm.val_dataloader()

    def on_fit_start(self, trainer, pl_module) -> None:
        if trainer.global_step > 0 or "student before" in self.rows:  # a resumed run keeps its "before"
            return
        # a teacher that reads its own prompt or tokens (cross-vocabulary, self-distillation) is not evaluated on the
        # student's: its own stage reports it
        if pl_module.teacher is not None and not pl_module.teacher_reads_its_own_input:
            self.rows["teacher"] = greedy_eval(pl_module, self._loader(trainer), pl_module.teacher)
        self.rows["student before"] = greedy_eval(pl_module, self._loader(trainer), pl_module.student)

    def on_fit_end(self, trainer, pl_module) -> None:
        self.rows["student after"] = greedy_eval(pl_module, self._loader(trainer), pl_module.student)
        self.print_and_save(trainer)

    @rank_zero_only
    def print_and_save(self, trainer) -> None:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"{self.split} split: greedy accuracy")
        tools = [c for c in TOOL_COLUMNS if all(c[0] in r for r in self.rows.values())]
        for col in ("model", "accuracy", "mean response length", "tokens/s", "n", *(c[1] for c in tools)):
            table.add_column(col, justify="left" if col == "model" else "right")
        for name, r in self.rows.items():
            table.add_row(name, f"{100 * r['acc']:.1f}%", f"{r['response_len']:.1f}", f"{r['tokens_per_s']:.0f}",
                          str(r["n"]), *(fmt.format(r[key]) for key, _, fmt in tools))
        Console(width=140 if tools else 100).print(table)
        if "student before" in self.rows:
            gain = 100 * (self.rows["student after"]["acc"] - self.rows["student before"]["acc"])
            print(f"student gain: {gain:+.1f} points")
        out = Path(self.output_dir or trainer.default_root_dir) / self.filename
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(self.rows, indent=1))

    def state_dict(self) -> dict:
        return {"rows": self.rows}

    def load_state_dict(self, state_dict: dict) -> None:
        self.rows = state_dict.get("rows", {})
