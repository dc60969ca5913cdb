"""Samples per second of one REOPOLD training step, on the peer benchmark's fixtures and settings.

    python ../shared/peers/tiny_setup.py FIXTURES          # once: tokenizer, teacher, student, prompts
    python benchmarks/throughput.py FIXTURES [--steps 20] [--warmup 2] [--algorithm reopold]

Each step is the framework's real one, through ``lightning.Trainer.fit`` and the Hydra-composed components
(``algorithm=reopold``: log-ratio reward, mixture clip, exploration then entropy selection): 64 prompts ->
the student samples 32 new tokens (temperature 1, KV cache) -> the teacher scores them (no grad) -> the
student scores them with grad -> one AdamW step (lr 1e-3, constant). Same fixtures, batch, sampling, optimiser
and timing as ``../shared/peers/plain_opd_bench.py`` and ``trl_opd_bench.py``: the clock starts at the end of
the last untimed warm-up step and stops at the end of the last timed one. Ends with the peers' line:

    steps=<n> samples=<n> seconds=<s> samples_per_s=<x> gen_tokens_per_s=<y>

and ``peak_rss_mb=<m>``. ``--phases`` adds the wall time per timed step of each phase (rollout, teacher
scoring, the student's scoring forward, the backward) and the rest of the step; with ``accel=cpu`` the student's
prompt runs in the rollout (its prefill kept for the scoring), which moves time from scoring to the rollout. Keep
the machine otherwise idle (see the peers' README): two busy threads on two cores slow tiny models several times.

``--ranks 2`` runs the same global step data-parallel, as ``trainer=ddp_cpu`` does: two processes (gloo),
32 prompts each, ``threads // ranks`` intra-op threads each, gradients averaged, the loss and the entropy
quantile taken over both ranks' tokens (``src/modules/method/losses.py``, ``selection.py``). Rank 0 prints; tokens
and the ranks' peak resident memories are summed (an upper bound on the job's peak).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from lightning import Callback  # noqa: E402


class PhaseClock(Callback):
    """Wall time of each phase of the timed steps, by wrapping the module's sampler, scorer and backward
    (``--phases``)."""

    def __init__(self, module, warmup: int):
        phases = {"rollout": (module, "sampler"), "teacher scoring": (module.scorer, "teacher_logp"),
                  "student scoring": (module.scorer, "student_logp"), "backward": (module, "manual_backward")}
        self.warmup, self.seconds, self.timing = warmup, {label: 0.0 for label in phases}, False
        for label, (owner, name) in phases.items():
            setattr(owner, name, self._timed(getattr(owner, name), label))

    def _timed(self, fn, label):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if self.timing:
                    self.seconds[label] += time.perf_counter() - t0
        return timed

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.timing = batch_idx + 1 >= self.warmup  # from the first timed step on


class StepClock(Callback):
    """Wall clock from the end of warm-up step ``warmup`` to the end of the last step; generated tokens."""

    def __init__(self, warmup: int):
        self.warmup, self.t0, self.t1, self.gen_tokens = warmup, None, None, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = batch_idx + 1
        if step == self.warmup:
            self.t0 = time.perf_counter()
        elif step > self.warmup:
            m = trainer.callback_metrics
            self.gen_tokens += int(round(float(m["train/response_len"]) * float(m["train/samples"])))
            self.t1 = time.perf_counter()


def fixture_rows(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{"prompt": r["prompt"], "answer": r.get("answer", "")} for r in rows]


def build(args):
    from hydra import compose, initialize_config_dir

    fx = Path(args.fixtures).resolve()
    overrides = [
        "experiment=reopold_tiny", f"algorithm={args.algorithm}", "model=pretrained",
        f"model.student.path={fx / 'student'}", f"+model.student.tokenizer={fx / 'tokenizer'}",
        f"model.teacher.path={fx / 'teacher'}", f"+model.teacher.tokenizer={fx / 'tokenizer'}",
        "model.student.dtype=float32", "model.teacher.dtype=float32",
        f"rollout.max_new_tokens={args.max_new_tokens}", "rollout.temperature=1.0", "rollout.top_p=1.0",
        "rollout.top_k=0", "rollout.num_samples=1", "module.optimizer.lr=1e-3", "module.optimizer.weight_decay=0.01",
        "module.scheduler=null", f"seed={args.seed}", *args.overrides,
    ]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    import hydra
    from lightning import Trainer

    from src.datamodules.prompts import PromptDataModule

    module = hydra.utils.instantiate(cfg.module)
    rows = fixture_rows(fx / "prompts.jsonl")
    dm = PromptDataModule(train=lambda: rows, batch_size=args.batch // args.ranks, seed=args.seed)
    dm.set_tokenizer(module.student_spec.load_processor())
    clock = StepClock(args.warmup)
    callbacks = [clock]
    if args.phases:
        module.configure_model()
        clock.phases = PhaseClock(module, args.warmup)
        callbacks.append(clock.phases)
    if cfg.callbacks.get("phase_schedule"):
        callbacks.append(hydra.utils.instantiate(cfg.callbacks.phase_schedule))
    strategy = "auto"
    if args.ranks > 1:
        from lightning.pytorch.strategies import DDPStrategy

        strategy = DDPStrategy(process_group_backend="gloo")
    trainer = Trainer(accelerator="cpu", devices=args.ranks, strategy=strategy,
                      max_steps=args.warmup + args.steps, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, num_sanity_val_steps=0, callbacks=callbacks,
                      inference_mode=False)
    return cfg, module, dm, trainer, clock


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("fixtures", help="folder written by ../shared/peers/tiny_setup.py")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--algorithm", default="reopold")
    ap.add_argument("--phases", action="store_true", help="also print the wall time per step of each phase")
    ap.add_argument("--ranks", type=int, default=1, help="data-parallel processes sharing the batch (DDP, gloo)")
    ap.add_argument("--no-keep-freed-memory", dest="keep_freed_memory", action="store_false",
                    help="leave glibc malloc at its defaults (src/train.py's keep_freed_memory=false)")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides (e.g. module.chunk_size=4096)")
    args = ap.parse_intermixed_args(argv)  # overrides may follow options
    if args.warmup < 1:
        ap.error("--warmup must be >= 1 so the clock has a start point")
    if args.ranks < 1 or args.batch % args.ranks:
        ap.error(f"--ranks must be >= 1 and divide --batch ({args.batch}), got {args.ranks}")
    if args.ranks > 1:  # the cores are shared out between the ranks (the env var: Lightning's launcher reads it)
        torch.set_num_threads(max(1, torch.get_num_threads() // args.ranks))
        os.environ["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    rank0 = os.environ.get("LOCAL_RANK", "0") == "0"  # Lightning starts ranks >= 1 with LOCAL_RANK set
    import warnings

    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
    if args.keep_freed_memory:  # as src/train.py does by default
        from src.utils.allocator import keep_freed_memory

        keep_freed_memory()
    torch.manual_seed(args.seed)
    cfg, module, dm, trainer, clock = build(args)
    if rank0:
        print(f"framework=reopold algorithm={args.algorithm} torch={torch.__version__} threads={torch.get_num_threads()} "
              f"ranks={args.ranks} device=cpu batch={args.batch} samples_per_prompt=1 "
              f"max_new_tokens={args.max_new_tokens} temperature=1.0 top_k=0 top_p=1.0 lr=0.001 lr_scheduler=constant "
              f"untimed_warmup_steps={args.warmup} timed_steps={args.steps} loadavg1={os.getloadavg()[0]:.2f}",
              flush=True)
    trainer.fit(module, datamodule=dm)
    seconds = clock.t1 - clock.t0  # the ranks meet at every step's gradient all-reduce
    gen_tokens, rss_mb = clock.gen_tokens, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.ranks > 1:
        gen_tokens, rss_mb = (float(trainer.strategy.reduce(torch.tensor(float(v)), reduce_op="sum"))
                              for v in (gen_tokens, rss_mb))
    n = args.steps
    out = {"steps": n, "samples": n * args.batch, "seconds": seconds, "samples_per_s": n * args.batch / seconds,
           "gen_tokens_per_s": gen_tokens / seconds, "peak_rss_mb": rss_mb}
    if not trainer.is_global_zero:
        return out
    print(f"steps={n} samples={n * args.batch} seconds={seconds:.3f} samples_per_s={out['samples_per_s']:.2f} "
          f"gen_tokens_per_s={out['gen_tokens_per_s']:.1f} peak_rss_mb={out['peak_rss_mb']:.0f}", flush=True)
    if args.phases:
        per_step = {k: 1e3 * v / n for k, v in clock.phases.seconds.items()}
        per_step["rest of the step"] = 1e3 * seconds / n - sum(per_step.values())
        print(" ".join(f"{k.replace(' ', '_')}_ms={v:.1f}" for k, v in per_step.items()), flush=True)
        out["phases_ms"] = per_step
    return out


if __name__ == "__main__":
    main()
