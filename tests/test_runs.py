"""A run's folder and the checkpoint it resumes (``src/utils/runs.py``): nothing of one run is lost to another."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
import torch

from src.eval import eval_checkpoint
from src.train import train

COMMON = ("test=false", "trainer.val_check_interval=100", "callbacks.model_checkpoint.every_n_train_steps=1",
          "trainer.max_steps=2")


def _run_in(make_cfg, folder: Path, *overrides):
    cfg = make_cfg(*COMMON, *overrides)
    cfg.paths.output_dir = str(folder)
    return cfg


def test_a_second_run_on_the_same_output_folder_is_refused_and_the_first_is_kept(make_cfg, tmp_path):
    folder = tmp_path / "shared"
    train(_run_in(make_cfg, folder, "seed=1"))
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    with pytest.raises(FileExistsError, match=rf"output folder {folder} already holds a run started .* give this run "
                                              r"its own folder|hydra.run.dir"):
        train(_run_in(make_cfg, folder, "seed=2"))
    after = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert after == before  # the first run's checkpoints, export and config are untouched
    assert json.loads((folder / "run.json").read_text())["pid"] > 0


def test_a_run_stopped_by_a_config_check_leaves_its_folder_to_the_corrected_command(make_cfg, tmp_path, capsys):
    folder = tmp_path / "fix"
    with pytest.raises(Exception, match="data.batch_size must be a positive whole number, got 0"):
        train(_run_in(make_cfg, folder, "data.batch_size=0"))
    assert (folder / "run.json").exists() and not (folder / "config_resolved.yaml").exists()
    train(_run_in(make_cfg, folder))
    assert "which ended before writing its config or a checkpoint: taking it over" in capsys.readouterr().out
    assert (folder / "config_resolved.yaml").exists()


def test_a_folder_of_a_run_still_running_elsewhere_is_refused_even_before_it_wrote_anything(make_cfg, tmp_path):
    folder = tmp_path / "busy"
    folder.mkdir()
    # pid 1 is alive on every machine; the run it records has written nothing yet (it is still loading)
    (folder / "run.json").write_text(json.dumps({"started": "now", "host": socket.gethostname(), "pid": 1}))
    with pytest.raises(FileExistsError, match=r"already holds a run started now .*\(pid 1\)"):
        train(_run_in(make_cfg, folder))


def _task_run(make_cfg, name: str, *overrides):
    cfg = make_cfg(*COMMON, *overrides)
    cfg.paths.output_dir = str(Path(cfg.paths.log_dir) / cfg.task_name / "runs" / name)
    return cfg


def test_ckpt_path_last_resumes_only_a_run_with_this_config(make_cfg, tmp_path):
    mine = _task_run(make_cfg, "a", "seed=1", "module.optimizer.lr=1e-4")
    train(mine)
    time.sleep(0.05)
    train(_task_run(make_cfg, "b", "seed=2", "module.optimizer.lr=1e-3"))  # newer, another config
    resumed = make_cfg(*COMMON, "seed=1", "module.optimizer.lr=1e-4", "trainer.max_steps=3", "ckpt_path=last")
    resumed.paths.output_dir = str(tmp_path / "resumed")
    _, obj = train(resumed)
    assert obj["trainer"].global_step == 3
    assert obj["trainer"].ckpt_path == str(Path(mine.paths.output_dir) / "checkpoints" / "last.ckpt")
    assert obj["trainer"].optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-4)  # not run b's 1e-3

    stranger = make_cfg(*COMMON, "seed=3", "ckpt_path=last")
    stranger.paths.output_dir = str(tmp_path / "stranger")
    with pytest.raises(FileNotFoundError, match=r"none of the 2 runs .* has this run's config; the newest, .*, differs "
                                                r"in .*seed"):
        train(stranger)
    assert not (tmp_path / "stranger" / "checkpoints").exists()


def test_a_truncated_checkpoint_is_named_with_the_newest_intact_one(make_cfg, tmp_path):
    first = _task_run(make_cfg, "a")
    train(first)
    ckpts = Path(first.paths.output_dir) / "checkpoints"
    last = ckpts / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    intact = [p for p in ckpts.glob("*.ckpt") if p != last]
    assert intact
    again = make_cfg(*COMMON, "trainer.max_steps=3", "ckpt_path=last")
    again.paths.output_dir = str(tmp_path / "again")
    with pytest.raises(ValueError, match=rf"checkpoint {last} is corrupt or truncated .*the newest intact checkpoint "
                                         rf"beside it is .*\.ckpt: pass ckpt_path="):
        train(again)
    with pytest.raises(ValueError, match="corrupt or truncated"):
        eval_checkpoint(str(last))
    assert torch.load(intact[0], map_location="cpu", weights_only=False)["global_step"] >= 1
    # damaged inside, its zip directory intact
    middle = ckpts / "middle.ckpt"
    data = bytearray(intact[0].read_bytes())
    data[len(data) // 2: len(data) // 2 + 4096] = bytes(4096)
    middle.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"checkpoint {middle} is corrupt or truncated \(BadZipFile: member .* "
                                         r"fails its CRC check\)"):
        eval_checkpoint(str(middle))


def test_a_weights_only_checkpoint_is_refused_as_a_resume_and_still_evaluates(make_cfg, tmp_path):
    light = "+callbacks.model_checkpoint.save_weights_only=true"
    first = _task_run(make_cfg, "light", light)
    train(first)
    last = Path(first.paths.output_dir) / "checkpoints" / "last.ckpt"
    assert "optimizer_states" not in torch.load(last, map_location="cpu", weights_only=False)
    for ckpt in (str(last), "last"):  # refused by resolve_ckpt_path, before the Trainer or a model is built
        again = make_cfg(*COMMON, light, "trainer.max_steps=3", f"ckpt_path={ckpt}")
        again.paths.output_dir = str(tmp_path / "again")
        with pytest.raises(ValueError, match=r"holds weights only \(callbacks.model_checkpoint.save_weights_only="
                                             r"true\): it cannot resume a run.*model.student.path="):
            train(again)
    assert eval_checkpoint(str(last)) == str(last)  # it still evaluates


def test_a_checkpoint_of_another_config_resumes_with_a_warning_naming_the_keys(make_cfg, tmp_path):
    first = _task_run(make_cfg, "a", "seed=1")
    train(first)
    other = make_cfg(*COMMON, "seed=4", "trainer.max_steps=3",
                     f"ckpt_path={Path(first.paths.output_dir) / 'checkpoints' / 'last.ckpt'}")
    other.paths.output_dir = str(tmp_path / "other")
    with pytest.warns(UserWarning, match=r"that run's config differs from this one in data.seed, module.seed, seed; the checkpoint's weights"):
        train(other)


def test_eval_refuses_ckpt_path_last():
    with pytest.raises(ValueError, match="ckpt_path=last: src/eval.py evaluates one checkpoint file"):
        eval_checkpoint("last")
    with pytest.raises(FileNotFoundError, match="ckpt_path=nowhere.ckpt does not exist"):
        eval_checkpoint("nowhere.ckpt")


@pytest.mark.parametrize("variable", ["RANK", "LOCAL_RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK"])
def test_only_the_first_process_of_a_launch_claims_the_folder(tmp_path, monkeypatch, variable):
    from omegaconf import OmegaConf

    from src.utils.runs import claim_output_dir

    cfg = OmegaConf.create({"paths": {"output_dir": str(tmp_path / "run")}})
    claim_output_dir(cfg, None)
    monkeypatch.setenv(variable, "1")  # another rank of the same launch, same folder: no claim, no refusal
    claim_output_dir(cfg, None)
    monkeypatch.setenv(variable, "0")
    (tmp_path / "run" / "config_resolved.yaml").write_text("seed: 0\n")  # the first run got as far as its config
    with pytest.raises(FileExistsError, match="already holds a run"):
        claim_output_dir(cfg, None)
