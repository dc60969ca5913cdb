"""``keep_freed_memory``: glibc's mallopt takes the setting, and a freed large tensor's pages are reused."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import resource, sys
sys.path.insert(0, {root!r})
import torch
if {keep}:
    from src.utils.allocator import keep_freed_memory
    assert keep_freed_memory()
def step():  # a training step's activations: 3 x 64 MiB, allocated, then all freed
    xs = [torch.ones(16 << 20) for _ in range(3)]
    del xs
for _ in range(3):
    step()
counts = []
for _ in range(3):  # the least of 3 blocks: on these VMs a block now and then faults pages in anyway
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        step()
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(counts))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_tensors_pages_are_reused_without_page_faults():
    faults = {}
    for keep in (False, True):  # fresh processes: the setting is process-wide and cannot be undone
        out = subprocess.run([sys.executable, "-c", PROBE.format(root=str(ROOT), keep=keep)], check=True,
                             capture_output=True, text=True)
        faults[keep] = int(out.stdout.split()[-1])
    # by default glibc mmaps every allocation above 32 MiB (its adaptive threshold's ceiling) and unmaps it on
    # free, so each step faults its 3 x 16,384 pages in again; kept, the steps reuse the same pages
    assert faults[False] > 5 * 3 * 8000, faults
    assert faults[True] < faults[False] / 2, faults  # measured: 0; single blocks 32,768 or 98,304 at times


def test_the_key_is_not_part_of_a_stages_digest(make_cfg):
    from src.modules.models.stages import stage_digest

    cfg = make_cfg()
    assert cfg.keep_freed_memory is True
    assert stage_digest(cfg) == stage_digest(make_cfg("keep_freed_memory=false"))
