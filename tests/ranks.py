"""Ending a test's spawned rank."""

from __future__ import annotations

import os


def leave() -> None:
    """End a rank spawned by ``torch.multiprocessing.spawn`` once its results are saved: wait for the other rank,
    destroy the process group and exit without finalising the interpreter. gloo's worker threads can still hold
    tensors when the interpreter finalises (FSDP's state and a device mesh keep their groups alive past
    ``destroy_process_group``), which aborts the process now and then with SIGABRT ("terminate called without an
    active exception") after the test's work is done."""
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)
