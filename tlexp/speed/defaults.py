"""Fast defaults that change no result, chosen per device: allocator tuning, channels_last, precision.

``perf=naive`` turns each one off, for side-by-side measurements.
"""

from __future__ import annotations

import ctypes
import logging
import sys
from functools import cache

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
