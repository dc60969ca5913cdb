"""DDP with two CPU processes (gloo) through the real command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ranks import leave

ROOT = Path(__file__).resolve().parents[1]


def test_ddp_two_cpu_processes(tmp_path, cache_dir):
    cmd = [sys.executable, "src/train.py", "experiment=reopold_tiny", "trainer=ddp_cpu", "trainer.max_steps=3", "trainer.val_check_interval=3",
           "data.batch_size=4", "data.train.n=64", "data.val.n=8", "data.test.n=8", "rollout.max_new_tokens=8",
           "callbacks.progress_bar=null", "trainer.enable_progress_bar=false", f"paths.log_dir={tmp_path}",
           f"paths.cache_dir={cache_dir}", "callbacks.phase_schedule.switch_step=1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = list((tmp_path / "reopold_tiny" / "runs").iterdir())
    assert len(runs) == 1, f"one output folder expected for both ranks, got {runs}"
    assert (runs[0] / "checkpoints" / "last.ckpt").exists()
    assert (runs[0] / "checkpoints" / "hf" / "final" / "config.json").exists()
    assert "test/arithmetic/acc" in proc.stdout


def _ranks_agree_with_one_process(rank: int, world: int, store: str, out: str):
    """Each rank holds half the rows; DDP averages gradients. The loss's gradient and the entropy selection
    must be those of one process holding every row."""
    import torch
    import torch.distributed as dist

    from src.modules.method.losses import aggregate
    from src.modules.method.selection import EntropyTopQuantile

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(0)
    x_BT = torch.randn(6, 5, generator=g)
    mask_BT = torch.rand(6, 5, generator=g) > 0.4
    mask_BT[0] = False  # a sequence with no kept token
    mask_BT[5, :4] = False  # uneven token counts between the ranks' halves
    entropy_BT = torch.rand(6, 5, generator=g)
    entropy_BT[3:] += 1.0  # rank 1's tokens are all above rank 0's: a per-rank quantile would keep some of rank 0's
    mine = slice(3 * rank, 3 * rank + 3)
    results, grads = {}, {}
    for agg in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum"):
        w = torch.ones((), requires_grad=True)
        aggregate(w * x_BT[mine] ** 2 * w, mask_BT[mine], agg).backward()
        dist.all_reduce(w.grad)
        w.grad /= world  # what DDP's reducer does
        grads[agg] = float(w.grad)
    selection = EntropyTopQuantile(0.3)
    kept = selection(entropy_BT[mine], mask_BT[mine])
    # the references run after the group is gone: one process, every row
    dist.destroy_process_group()
    for agg, ddp in grads.items():
        ref = torch.ones((), requires_grad=True)
        aggregate(ref * x_BT**2 * ref, mask_BT, agg).backward()
        results[agg] = (ddp, float(ref.grad))
    whole = selection(entropy_BT, mask_BT)
    results["selection"] = bool(torch.equal(kept, whole[mine]))
    torch.save(results, f"{out}.{rank}")


def test_data_parallel_ranks_compute_the_single_process_loss_and_selection(tmp_path):
    import torch
    import torch.multiprocessing as mp

    mp.spawn(_ranks_agree_with_one_process, args=(2, str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2)
    for rank in range(2):
        results = torch.load(tmp_path / f"out.{rank}")
        selection_agrees = results.pop("selection")
        for agg, (ddp, one) in results.items():
            assert abs(ddp - one) < 1e-6 * max(1.0, abs(one)), (rank, agg, ddp, one)
        assert selection_agrees, rank


def _logs_over_ranks(rank: int, world: int, store: str, out: str):
    import torch
    import torch.distributed as dist

    from src.modules.distributed import over_ranks

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    logs = {"loss": torch.tensor(0.25 + rank), "samples": 4.0 + rank, "lr": 1e-3}
    reduced = over_ranks(logs, summed=("samples",))
    torch.save({k: float(v) for k, v in reduced.items()}, f"{out}.{rank}")
    leave()


def test_step_metrics_are_taken_over_every_rank(tmp_path):
    """Each rank's loss is its share of the batch's loss: the logged value is their mean on every rank; counts
    are summed."""
    import torch
    import torch.multiprocessing as mp

    from src.modules.distributed import over_ranks

    assert over_ranks({"loss": 1.0}) == {"loss": 1.0}  # one process: unchanged
    mp.spawn(_logs_over_ranks, args=(2, str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2)
    for rank in range(2):
        got = torch.load(tmp_path / f"out.{rank}")
        assert got == {"loss": 0.75, "samples": 9.0, "lr": torch.tensor(1e-3).item()}, (rank, got)


def test_a_tiny_model_built_on_a_rank_other_than_0_is_complete(tmp_path, monkeypatch):
    """transformers' ``save_pretrained`` writes no model files on a rank other than 0 of a started process group;
    a rank building a tiny model there still caches a complete folder (config and weights), and a folder left
    incomplete (tokenizer only) is replaced, not loaded."""
    import shutil

    import transformers.distributed.mixin as mixin

    from src.modules.models.tiny import TinyQwen2

    monkeypatch.setattr(mixin, "_is_torch_distributed_initialized", lambda: True)
    monkeypatch.setattr(mixin, "_get_torch_distributed_rank", lambda: 1)
    spec = TinyQwen2(cache_dir=str(tmp_path), hidden_size=32, num_layers=1)
    model = spec.load_model()  # builds
    files = {p.name for p in (tmp_path / spec.path).iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files, files

    for name in ("config.json", "model.safetensors", "generation_config.json"):  # what the bug left behind
        (tmp_path / spec.path / name).unlink()
    again = TinyQwen2(cache_dir=str(tmp_path), hidden_size=32, num_layers=1).load_model()
    assert all(a.equal(b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folders left behind"
    shutil.rmtree(tmp_path / spec.path)
