"""A run's folder and the checkpoint it resumes: nothing of one run is lost to another.

- ``claim_output_dir``: a run claims its output folder with ``run.json``, created exclusively (two runs started on
  one folder cannot both get it); a folder that already holds a run is refused, unless this run resumes that run's
  own checkpoint, or that run has ended on this host without writing its config or a checkpoint (a run stopped by
  a config check: the corrected command may use the folder).
- ``resolve_ckpt_path``: ``ckpt_path=last`` resumes the newest ``last.ckpt`` among this task's runs whose config
  matches this one (``config_resolved.yaml``, the config each run writes), up to the keys that say where a
  run writes and how long it trains (``RESUMABLE_DIFFERENCES``); with no such run it stops, naming the newest run
  and the keys that differ. A given path is taken as given, with a warning naming the keys that differ.
- ``check_checkpoint``: a truncated or corrupt checkpoint is named, with the newest intact one beside it offered.
  Lightning writes every single-file checkpoint atomically (to a temporary file, renamed into place).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import warnings
import zipfile
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

RUN_MARKER = "run.json"
RUN_CONFIG = "config_resolved.yaml"  # written by src.utils.instantiate.log_config
# where a run writes, how it reports progress, how long it trains: a run that differs only here resumes
RESUMABLE_DIFFERENCES = ("paths", "logger", "hydra", "task_name", "ckpt_path", "keep_freed_memory", "memory_check",
                         "cpu_miniature", "stage_check", "test", "validate_before", "trainer.max_steps",
                         "trainer.enable_progress_bar", "trainer.enable_model_summary", "callbacks.progress_bar")


RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


def _rank_zero() -> bool:
    """The launching process: Lightning's spawned ranks, torchrun's, SLURM's and MPI's others set one of these."""
    return all(os.environ.get(k, "0") == "0" for k in RANK_VARIABLES)


def claim_output_dir(cfg: DictConfig, resume_from: str | None) -> None:
    """Create ``<output_dir>/run.json`` exclusively, or refuse a folder that holds another run."""
    if not _rank_zero():
        return
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    marker = out / RUN_MARKER
    record = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "host": socket.gethostname(), "pid": os.getpid(),
              "command": " ".join(sys.argv), "resumed_from": resume_from}
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        if resume_from is not None and Path(resume_from).resolve().is_relative_to(out.resolve()):
            marker.write_text(json.dumps(record, indent=1))  # resuming this folder's own run: it continues here
            return
        try:
            earlier = json.loads(marker.read_text())
            who = f"a run started {earlier.get('started')} on {earlier.get('host')} (pid {earlier.get('pid')})"
        except (OSError, ValueError):
            earlier, who = {}, "another run"
        if _ended_with_nothing_written(out, earlier):  # e.g. stopped by a config check: the fixed command goes on
            print(f"[run] {out} held {who}, which ended before writing its config or a checkpoint: taking it over")
            marker.write_text(json.dumps(record, indent=1))
            return
        raise FileExistsError(f"output folder {out} already holds {who}: its checkpoints, export and config would be "
                              f"overwritten. Give this run its own folder (hydra.run.dir=...), or resume that run "
                              f"with ckpt_path={out / 'checkpoints' / 'last.ckpt'}") from None
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(record, indent=1))


def _ended_with_nothing_written(out: Path, earlier: dict) -> bool:
    """The run recorded in ``out`` is not running on this host and left neither its config nor a checkpoint."""
    if earlier.get("host") != socket.gethostname() or not isinstance(earlier.get("pid"), int):
        return False
    try:
        if earlier["pid"] != os.getpid():  # this process runs one run at a time: an earlier one of its own has ended
            os.kill(earlier["pid"], 0)
            return False  # still running (or its pid reused: refusing is the safe side)
    except ProcessLookupError:
        pass
    except PermissionError:
        return False
    checkpoints = out / "checkpoints"
    return not (out / RUN_CONFIG).exists() and not (checkpoints.exists() and any(checkpoints.iterdir()))


def _flat(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: node}


def config_differences(a: DictConfig | dict, b: DictConfig | dict) -> list[str]:
    """Dotted keys whose resolved values differ between two configs, outside ``RESUMABLE_DIFFERENCES`` and the
    values that name a run's own output folder (its checkpoint folder, Lightning's root)."""
    def flat(c):
        if isinstance(c, DictConfig):
            c = OmegaConf.to_container(c, resolve=True, throw_on_missing=False)
        own = str((c.get("paths") or {}).get("output_dir") or "\0")
        return {k: v for k, v in _flat(c).items()
                if not any(k == r or k.startswith(r + ".") for r in RESUMABLE_DIFFERENCES)
                and not (isinstance(v, str) and v.startswith(own))}
    fa, fb = flat(a), flat(b)
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k, "<absent>") != fb.get(k, "<absent>"))


def check_checkpoint(path: Path) -> None:
    """Raise naming ``path`` when it is not a readable checkpoint, offering the newest intact one beside it."""
    if path.is_dir():  # a distributed checkpoint (FSDP2): a folder of shards and metadata
        if not (path / ".metadata").exists():
            raise ValueError(f"checkpoint {path} is a folder without .metadata: not a complete distributed checkpoint")
        return
    try:
        with zipfile.ZipFile(path) as z:
            damaged = z.testzip()  # every member read against its CRC: damage inside the file, not only truncation
        if damaged is not None:
            raise zipfile.BadZipFile(f"member {damaged} fails its CRC check")
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        intact = [p for p in sorted(path.parent.glob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
                  if p != path and zipfile.is_zipfile(p)]
        offer = f"; the newest intact checkpoint beside it is {intact[0]}: pass ckpt_path={intact[0]}" if intact else ""
        raise ValueError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: {e}){offer}") from None


def check_resumable(path: Path) -> None:
    """Refuse, before any model loads, a single-file checkpoint written with ``save_weights_only``: it holds the
    weights but no optimizer, schedule or loop state, which Lightning needs to go on with a run."""
    if path.is_dir():
        return
    import torch

    keys = torch.load(path, map_location="cpu", weights_only=False, mmap=True).keys()
    if "optimizer_states" not in keys:
        raise ValueError(f"checkpoint {path} holds weights only (callbacks.model_checkpoint.save_weights_only=true): "
                         f"it cannot resume a run, which needs the optimizer's, the schedule's and the loop's state. "
                         f"Start a new run from its weights instead: model.student.path=<the run's "
                         f"checkpoints/hf/final export>, or keep full checkpoints (save_weights_only=false) to resume")


def existing_checkpoint(ckpt: str) -> Path:
    """``ckpt`` as a path that exists and reads as a checkpoint (``check_checkpoint``)."""
    path = Path(ckpt)
    if not path.exists():
        raise FileNotFoundError(f"ckpt_path={ckpt} does not exist")
    check_checkpoint(path)
    return path


def _listed(keys: list[str], most: int = 10) -> str:
    return ", ".join(keys[:most]) + (" ..." if len(keys) > most else "")


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """The checkpoint to resume: None, a checked path, or (``ckpt_path=last``) the newest matching run's."""
    ckpt = cfg.get("ckpt_path")
    if not ckpt:
        return None
    if ckpt == "last":
        runs = Path(cfg.paths.log_dir) / cfg.task_name
        found = sorted(runs.glob("**/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
        if not found:
            raise FileNotFoundError(f"ckpt_path=last: no checkpoints/last.ckpt under {runs}")
        mismatched = []
        for candidate in found:
            run_dir = candidate.parent.parent
            if not (run_dir / RUN_CONFIG).exists():
                mismatched.append((run_dir, [f"(no {RUN_CONFIG})"]))
                continue
            diff = config_differences(OmegaConf.load(run_dir / RUN_CONFIG), cfg)
            if not diff:
                check_checkpoint(candidate)
                check_resumable(candidate)
                print(f"[resume] ckpt_path=last: {candidate}")
                return str(candidate)
            mismatched.append((run_dir, diff))
        run_dir, diff = mismatched[0]
        raise FileNotFoundError(f"ckpt_path=last: none of the {len(found)} runs with a last.ckpt under {runs} has this "
                                f"run's config; the newest, {run_dir}, differs in {_listed(diff)}. Pass its "
                                f"checkpoint as ckpt_path=<path> to "
                                f"resume it anyway")
    path = existing_checkpoint(ckpt)
    check_resumable(path)
    run_config = path.parent.parent / RUN_CONFIG
    if run_config.exists():
        diff = config_differences(OmegaConf.load(run_config), cfg)
        if diff:
            warnings.warn(f"ckpt_path={ckpt}: that run's config differs from this one in {_listed(diff)}; the "
                          f"checkpoint's weights, optimizer and "
                          f"schedule state (its learning rate included) continue that run", stacklevel=2)
    return str(path)
