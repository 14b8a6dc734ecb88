"""Fast defaults that change no result, chosen per device: allocator tuning, channels_last, precision.

``perf=naive`` turns each one off, for side-by-side measurements.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4


def tune_glibc_malloc() -> bool:
    """Keep freed memory in the heap instead of returning it to the kernel after every tensor.

    glibc serves large tensors with mmap and unmaps them on free, so each forward pass page-faults
    its activations in again (measured here: ~900k faults and 2.2 s of kernel time per ResNet-50
    batch of 32; ~2k faults and 0.01 s with this). Process-wide and idempotent; a no-op off glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 1 << 30), (_M_TOP_PAD, 256 << 20))
    return all(libc.mallopt(param, value) == 1 for param, value in settings)


@cache
def cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def uses_cuda(accelerator: str) -> bool:
    """Whether Lightning's ``accelerator`` setting trains on a CUDA GPU here."""
    return accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def resolve_precision(precision: str, accelerator: str) -> str:
    """``auto``: bf16 mixed precision on CPUs that run it natively, else fp32.

    Without native bf16 a CPU emulates it, which is slower than fp32 (measured here: 2.6x slower
    for a ResNet-50 forward on an AVX-512 CPU without avx512_bf16/AMX). On a GPU, fp32: Lite0 at
    batch 32 is launch-bound there, and bf16-mixed with channels_last was slower on an H100
    (114 s vs 86 s, issue 13) and on an H200 (whole bench sweep 92 s vs 67 s: docs/bench_gpu_notes.md).
    """
    if precision != "auto":
        return precision
    if uses_cuda(accelerator):
        return "32-true"
    return "bf16-mixed" if cpu_has_native_bf16() else "32-true"


def resolve_channels_last(setting: bool | str, accelerator: str) -> bool:
    """``auto``: NHWC on a CPU (oneDNN's faster layout), not on a GPU (see ``resolve_precision``)."""
    if setting == "auto":
        return not uses_cuda(accelerator)
    return bool(setting)


# A guess of one job's GPU memory, with room: the seed_table_offline rows (Lite0) peaked at 0.1-0.9 GiB
# each on an H200 (docs/bench_gpu.md); larger backbones trained in full take more.
_GPU_GIB_PER_JOB = 8
# A job's host memory besides its feature store's RAM (perf.cache_budget_gb): a Lite0 blocks_2 job on all
# of TF Flowers with 12 loader workers peaked at 3.9 GiB (PSS of its processes), about 1.9 GiB of it values
# the store held (docs/bench_gpu_notes.md).
_HOST_GIB_PER_JOB = 2


# The memory limit of this process's cgroup (a container's --memory, a SLURM job's --mem): v2, then v1.
_CGROUP_LIMITS = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))


def host_memory_gib() -> float | None:
    """The memory this process may use: the machine's, or its cgroup's limit where that is lower."""
    sizes = []
    try:
        sizes.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows) or no such name
        pass
    for limit in _CGROUP_LIMITS:
        try:
            text = limit.read_text().strip()
        except OSError:
            continue
        if text.isdigit():  # "max": no limit
            sizes.append(int(text))
    return min(sizes) / 2**30 if sizes else None


def side_by_side_jobs(accelerator: str, cache_budget_gb: float = 0) -> int:
    """How many jobs of a local sweep run at once: several on one GPU, one at a time on a CPU.

    A job on a GPU is launch-bound at batch 32 (its Python loop, not the GPU, sets the pace:
    issue 13), so jobs side by side fill the idle GPU without changing any job's recipe or result.
    Each takes a CPU core for its loop plus loader workers, so at most half the cores, a share
    of the GPU's memory, and of the host's: its feature store keeps up to ``cache_budget_gb`` in
    RAM. A CPU job already uses every core: one at a time there. Several GPUs: one at a time too,
    since each job's Trainer would take all of them.
    """
    if not uses_cuda(accelerator) or torch.cuda.device_count() != 1:
        return 1
    gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    # the cores this process may use (taskset, a SLURM allocation), not the node's; Linux only
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
    host = host_memory_gib()
    by_host = 8 if host is None else int(host // (_HOST_GIB_PER_JOB + max(cache_budget_gb, 0) * 1e9 / 2**30))
    return max(1, min(8, cores // 2, int(gib // _GPU_GIB_PER_JOB), by_host))
