"""See where the credit goes: a token-level page of a few rollouts every ``every_n_steps`` steps.

Each page is one self-contained HTML file under ``<run>/rollouts/step_<N>.html`` (``N`` zero-padded to six digits),
written after step ``N``'s update and after every validation: the student's responses to a
fixed set of prompts (the first ``n_prompts`` of the validation split, so pages compare across steps), sampled at
the rollout temperature with the student of that step, scored by the teacher and passed through the run's own
reward, clip and token selection (``objective.prepare`` with the selection in force: the exploration rule before
the phase switch, the entropy rule after). Every response token is coloured by its reward ``log pi_t - log pi_s``
(green above 0, red below), struck through where the floor clipped it, faded where the selection dropped it; its
title (hover) gives the reward, the student's entropy and both log-probs. Under a cross-vocabulary teacher a span's
reward sits on its last student token; the span's other tokens carry none and are shown uncoloured. A tool-use
episode's environment replies
(the tool's answer and the chat template around it: attended by both models, neither sampled nor scored, so
``response_mask_BT`` is 0 on them inside the episode) stand between the turns as grey blocks without a reward. A
vision-language row shows its images as the model saw them, embedded as PNG data (rebuilt from the batch's pixels,
after the resize: ``src/callbacks/seen_images.py``). The header gives the phase, the step and the step's batch
scalars. ``index.html`` links every page; ``python src/inspect_run.py <run dir>`` lists them (and opens the index)
without loading a model, and with ``--step N --screenshot out.png`` renders a page in headless Chromium.

With a TensorBoard or a Weights & Biases logger, each page's step also gets histograms of the reward, the advantage
and the student's entropy of the kept and of the dropped tokens (``rollouts/...``), over the page's rollouts (not the
training batch), at the step the training scalars of that step were logged at.

The page's rollout is drawn on its own sampling stream (the sampler forks the RNG), so the training run is the
same with or without the viewer; it costs one extra rollout and teacher scoring of ``n_prompts`` prompts per page.
Only that page's rows are held in memory (of an image batch, its first ``n_prompts`` rows with their own images).

    python src/train.py ... callbacks.rollout_viewer.every_n_steps=25
"""

from __future__ import annotations

import html
import json
import math
import time
import warnings
from pathlib import Path

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback

from src.callbacks.diagnostics import first_rows
from src.callbacks.phase import EXPLORATION, PhaseSchedule
from src.callbacks.seen_images import png_data_uri, row_images
from src.modules.models.multimodal import has_images, kwargs_of_rows

VIEWER_STREAM = 1_000_033  # the sampling stream of the pages' rollouts: apart from training and evaluation
PAGE_STYLE = """
body { font-family: sans-serif; margin: 1.5em; } .tok { white-space: pre-wrap; font-family: monospace; }
.clipped { text-decoration: line-through; } .dropped { opacity: 0.45; } .row { margin: 1em 0; padding: 0.5em;
border: 1px solid #ccc; } .prompt { color: #555; white-space: pre-wrap; } .scalars { columns: 16em; font-size: 0.9em; }
.tool { margin: 0.3em 0; padding: 0.2em 0.5em; background: #eee; color: #444; border-left: 3px solid #999;
white-space: pre-wrap; font-family: monospace; } .tool-label { font-family: sans-serif; font-size: 0.8em; color: #777; }
.images img { min-height: 56px; image-rendering: pixelated; margin: 0 0.5em 0.3em 0; border: 1px solid #ccc; }
"""


def reward_colour(reward: float, scale: float = 2.0) -> str:
    """Green for a positive reward, red for a negative one, stronger up to ``|reward| = scale``."""
    if not math.isfinite(reward):
        return "rgb(200,200,200)"
    a = min(abs(reward) / scale, 1.0)
    return f"rgba(0,160,0,{a:.2f})" if reward >= 0 else f"rgba(220,0,0,{a:.2f})"


def page_rows(ro, tokenizer, floor: float, n: int, image_processor=None) -> list[dict]:
    """The first ``n`` rows of a prepared rollout as plain data: prompt text; per token the policy sampled, its
    text, reward, clip and selection marks, entropy and both log-probs (``tokens``); a tool episode's environment
    replies, each its text and the number of sampled tokens before it (``tool_replies``); with an
    ``image_processor``, the row's images as PNG data URIs (``images``)."""
    rows = []
    response = ro.response_ids_BT
    sampled_BT = ro.response_mask_BT.bool()
    environment_BT = ro.attention_mask[:, ro.response_start :].bool() & ~sampled_BT  # attended, not sampled
    for b in range(min(n, response.shape[0])):
        prompt_ids = ro.input_ids[b, : ro.response_start][ro.attention_mask[b, : ro.response_start].bool()]
        tokens, replies = [], []
        scored = ro.response_mask_BT[b] if ro.scored_mask_BT is None else ro.scored_mask_BT[b]
        for t in torch.nonzero(sampled_BT[b] | environment_BT[b]).flatten().tolist():
            if environment_BT[b, t]:  # one reply runs on until the policy's next turn
                if not replies or replies[-1]["at"] != len(tokens):
                    replies.append({"at": len(tokens), "ids": []})
                replies[-1]["ids"].append(int(response[b, t]))
                continue
            reward = float(ro.reward_BT[b, t])
            tokens.append({
                "text": tokenizer.decode([int(response[b, t])]),
                "reward": reward,
                "scored": bool(scored[t]),  # a cross-vocabulary span's tokens before its last carry no reward
                "clipped": bool(scored[t]) and reward < floor,
                "kept": bool(ro.loss_mask_BT[b, t]),
                "entropy": float(ro.entropy_BT[b, t]) if ro.entropy_BT is not None else float("nan"),
                "teacher_logp": float(ro.teacher_logp_BT[b, t]) if ro.teacher_logp_BT is not None else float("nan"),
                "student_logp": float(ro.old_logp_BT[b, t]) if ro.old_logp_BT is not None else float("nan"),
            })
        images = [] if image_processor is None else row_images(ro.model_kwargs, b, image_processor)
        rows.append({"prompt": tokenizer.decode(prompt_ids, skip_special_tokens=False), "tokens": tokens,
                     "tool_replies": [{"at": r["at"], "text": tokenizer.decode(r["ids"], skip_special_tokens=False)}
                                      for r in replies],
                     "images": [png_data_uri(image) for image in images],
                     "reference": ro.references[b] if ro.references else None})
    return rows


def render_page(rows: list[dict], header: dict) -> str:
    """One self-contained HTML page (no scripts, no external files)."""
    scalars = "".join(f"<div><b>{html.escape(str(k))}</b> {v:.4g}</div>" if isinstance(v, float) else
                      f"<div><b>{html.escape(str(k))}</b> {html.escape(str(v))}</div>" for k, v in header.items())
    parts = [(f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>step {header.get('step')}</title>"
              f"<style>{PAGE_STYLE}</style></head><body>"),
             f"<h1>Rollouts at step {header.get('step')} ({html.escape(str(header.get('phase')))})</h1>",
             f"<div class='scalars'>{scalars}</div>",
             ("<p>Colour: reward log pi_t - log pi_s (green &gt; 0, red &lt; 0); struck through: clipped by the "
              "floor; faded: dropped by the selection; grey blocks: tool replies, read by the policy but neither "
              "sampled nor scored. Hover a token for its numbers.</p>")]
    for i, row in enumerate(rows):
        images = "".join(f"<img src='{uri}' alt='row {i}, image {k}'>" for k, uri in enumerate(row["images"]))
        parts.append(f"<div class='row' data-row='{i}'>" + (f"<div class='images'>{images}</div>" if images else "") +
                     f"<div class='prompt'>{html.escape(row['prompt'])}</div><div>")
        replies = {r["at"]: r["text"] for r in row["tool_replies"]}
        for k, tok in enumerate(row["tokens"]):
            if k in replies:
                parts.append(tool_reply(replies.pop(k)))
            scored = tok.get("scored", True)  # pages before cross-vocabulary teachers had no such field
            classes = "tok" + (" clipped" if tok["clipped"] else "") + ("" if tok["kept"] else " dropped")
            title = (f"reward {tok['reward']:.4f}" if scored else "no reward: its span's is on the span's last token") + \
                (f" | entropy {tok['entropy']:.4f} | teacher logp {tok['teacher_logp']:.4f} | student logp "
                 f"{tok['student_logp']:.4f}")
            colour = reward_colour(tok["reward"]) if scored else "none"
            parts.append(f"<span class='{classes}' style='background:{colour}' data-scored='{int(scored)}' "
                         f"title='{html.escape(title, quote=True)}' data-reward='{tok['reward']!r}' "
                         f"data-clipped='{int(tok['clipped'])}' data-kept='{int(tok['kept'])}'>"
                         f"{html.escape(tok['text'])}</span>")
        parts += [tool_reply(text) for text in replies.values()]  # after the last sampled token
        reference = f"<div class='prompt'>reference: {html.escape(str(row['reference']))}</div>" \
            if row["reference"] is not None else ""
        parts.append(f"</div>{reference}</div>")
    parts.append("</body></html>")
    return "".join(parts)


def tool_reply(text: str) -> str:
    return (f"<div class='tool' data-tool-reply='1'><div class='tool-label'>tool reply (context, not scored)</div>"
            f"{html.escape(text)}</div>")


def render_index(pages: list[str]) -> str:
    links = "".join(f"<li><a href='{html.escape(p, quote=True)}'>{html.escape(p)}</a></li>" for p in pages)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>rollouts</title></head><body>"
            f"<h1>Rollout pages</h1><ul>{links}</ul></body></html>")


class RolloutViewer(Callback):
    """Writes a token-level page of ``n_prompts`` rollouts every ``every_n_steps`` training steps (see the module
    docstring).

    Args:
        every_n_steps: rollout steps between pages (a page at step 0 too).
        n_prompts: the first validation prompts shown on every page.
        dirname: the folder under the run's output folder.
    """

    def __init__(self, every_n_steps: int = 50, n_prompts: int = 4, dirname: str = "rollouts"):
        for key, value in (("every_n_steps", every_n_steps), ("n_prompts", n_prompts)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"callbacks.rollout_viewer.{key} must be a positive whole number, got {value!r}")
        self.every_n_steps, self.n_prompts, self.dirname = every_n_steps, n_prompts, dirname
        self.batch = None
        self.last_rollout = None  # the rollout of the latest page (tests compare the page with it)
        self.seconds, self.pages = 0.0, 0  # time spent writing pages, and how many
        self.enabled = True  # set by setup: whether the objective has token rewards to show
        self.written: set[int] = set()  # the steps with a page (a validation right after a page's step adds none)
        self._fit_started = time.perf_counter()

    def setup(self, trainer, pl_module, stage: str) -> None:
        # token rewards exist under the policy-gradient objectives (REOPOLD, OPD, their ablations, GRPO); SFT, GKD
        # and the stage builds have none to show
        self.enabled = getattr(pl_module.objective, "reward", None) is not None
        if not self.enabled and stage == "fit" and trainer.is_global_zero:
            print(f"[rollout_viewer] {type(pl_module.objective).__name__} has no token reward to show: no pages")

    def folder(self, trainer) -> Path:
        return Path(trainer.default_root_dir) / self.dirname

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step // max(1, pl_module.updates_per_rollout) - 1  # the rollout step just taken
        if step % self.every_n_steps == 0:
            self._try_page(trainer, pl_module, step)

    def on_validation_end(self, trainer, pl_module) -> None:
        """A page at every validation during training (after the step it follows; not the sanity check's)."""
        step = trainer.global_step // max(1, pl_module.updates_per_rollout) - 1
        if trainer.state.fn == "fit" and not trainer.sanity_checking and step >= 0:
            self._try_page(trainer, pl_module, step)

    def _try_page(self, trainer, pl_module, step: int) -> None:
        if not self.enabled or step in self.written:
            return
        try:
            self.write_page(trainer, pl_module, step)
        except Exception as e:  # noqa: BLE001 - a debugging page never stops a run: said once, then no more pages
            self.enabled = False
            warnings.warn(f"callbacks.rollout_viewer: no page at step {step} ({type(e).__name__}: {e}); no "
                          f"more pages in this run", stacklevel=2)

    def on_train_start(self, trainer, pl_module) -> None:
        self._fit_started, self.seconds, self.pages = time.perf_counter(), 0.0, 0

    def on_train_end(self, trainer, pl_module) -> None:
        if self.pages and trainer.is_global_zero:
            total = time.perf_counter() - self._fit_started
            print(f"[rollout_viewer] {self.pages} pages in {self.seconds:.1f} s, {100 * self.seconds / total:.1f}% of "
                  f"the training's {total:.0f} s: {self.folder(trainer) / 'index.html'}")

    @torch.no_grad()
    def write_page(self, trainer, pl_module, step: int) -> Path | None:
        start = time.perf_counter()
        if self.batch is None:
            self.batch = self._page_batch(trainer, pl_module)
        batch = move_data_to_device(self.batch, pl_module.device)  # nested: an image batch's model_kwargs too
        ro = pl_module.sampler(pl_module.scorer.student, batch, eval_batch=VIEWER_STREAM + step, num_samples=1)
        pl_module.objective.prepare(ro, pl_module.scorer, pl_module.selection)
        self.last_rollout = ro
        floor = float(getattr(pl_module.objective.clipping, "floor", -math.inf))
        image_processor = pl_module.processor.image_processor if has_images(ro.model_kwargs) else None
        rows = page_rows(ro, pl_module.tokenizer, floor, self.n_prompts, image_processor)
        metrics = {k.removeprefix("train/"): float(v) for k, v in trainer.callback_metrics.items()
                   if k.startswith("train/") and torch.as_tensor(v).numel() == 1}
        schedule = next((c for c in trainer.callbacks if isinstance(c, PhaseSchedule)), None)
        phase = "-" if schedule is None else "exploration" if schedule.phase == EXPLORATION else "refinement"
        metrics.pop("phase", None)  # the schedule's own, below (the logged value may be the step before's)
        header = {"step": step, "phase": phase,
                  "selection": getattr(pl_module.selection, "rule", type(pl_module.selection).__name__),
                  "floor": floor, **dict(sorted(metrics.items()))}
        path = None
        if trainer.is_global_zero:
            folder = self.folder(trainer)
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"step_{step:06d}.html"
            path.write_text(render_page(rows, header), encoding="utf-8")
            (folder / f"step_{step:06d}.json").write_text(json.dumps({"header": header, "rows": rows}))
            pages = sorted(p.name for p in folder.glob("step_*.html"))
            (folder / "index.html").write_text(render_index(pages), encoding="utf-8")
            self._histograms(trainer, ro, step * max(1, pl_module.updates_per_rollout))
        self.seconds += time.perf_counter() - start
        self.pages += 1
        self.written.add(step)
        return path

    def _page_batch(self, trainer, pl_module) -> dict:
        """The first ``n_prompts`` validation prompts as one batch."""
        loader = trainer.val_dataloaders if trainer.val_dataloaders is not None else \
            trainer.datamodule.val_dataloader()
        first = next(iter(loader), None)
        if first is None:
            raise ValueError("callbacks.rollout_viewer: the validation split is empty (its first prompts are the "
                             "pages' prompts)")
        if not first.get("model_kwargs"):
            cross_vocab = pl_module.scorer.cross_vocab
            return first_rows(loader, self.n_prompts, pl_module.tokenizer.pad_token_id,
                              None if cross_vocab is None else cross_vocab.teacher_tok.pad_token_id,
                              who="callbacks.rollout_viewer")
        # image rows carry their pixels per batch (flat, by image): the first batch's first rows, with their images
        B = len(first["input_ids"])
        rows = torch.arange(min(self.n_prompts, B))
        return {k: kwargs_of_rows(v, rows, B) if k == "model_kwargs" else
                v[: len(rows)] if isinstance(v, (torch.Tensor, list)) and len(v) == B else v
                for k, v in first.items()}

    @staticmethod
    def _histograms(trainer, ro, step: int) -> None:
        """``step``: the logger step the page's training step logged its scalars at."""
        from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

        valid = ro.response_mask_BT if ro.scored_mask_BT is None else ro.response_mask_BT & ro.scored_mask_BT
        kept = ro.loss_mask_BT & valid
        values = {"rollouts/reward": ro.reward_BT[valid], "rollouts/advantage": ro.advantage_BT[valid]}
        if ro.entropy_BT is not None:
            values["rollouts/entropy_kept"] = ro.entropy_BT[kept]
            values["rollouts/entropy_dropped"] = ro.entropy_BT[valid & ~kept]
        values = {tag: v.detach().float().cpu() for tag, v in values.items() if v.numel()}
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                for tag, v in values.items():
                    logger.experiment.add_histogram(tag, v, step)
            elif isinstance(logger, WandbLogger):  # wandb is there: the logger could not be made without it
                import wandb

                # on the x-axis WandbLogger gives every metric (trainer/global_step): the page's step's
                logger.experiment.log({**{tag: wandb.Histogram(v.numpy()) for tag, v in values.items()},
                                       "trainer/global_step": step})
