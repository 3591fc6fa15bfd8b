"""Which device a peer trains on, and what it can tell the coordinator about it."""

from __future__ import annotations

from dataclasses import dataclass

import torch


class DeviceError(ValueError):
    """The requested device cannot be used; the message says what to pass instead."""


@dataclass(frozen=True)
class DeviceInfo:
    device: torch.device
    description: str
    free_memory_bytes: int
    auto: bool


def probe_device(gpu: str) -> DeviceInfo:
    """Resolve ``--gpu`` (a CUDA index, 'cpu' or 'auto') to a usable torch device."""
    value = gpu.strip().lower()
    if value == "cpu":
        return _cpu(auto=False)
    if value == "auto":
        return _cuda(0, auto=True) if torch.cuda.is_available() else _cpu(auto=True)
    try:
        index = int(value)
    except ValueError:
        raise DeviceError(f"--gpu {gpu!r} is neither a CUDA device index nor 'cpu'") from None
    if not torch.cuda.is_available():
        raise DeviceError(f"--gpu {index} asked for a CUDA GPU, but this torch build or machine has none; to train on the processor pass --gpu cpu")
    if not 0 <= index < torch.cuda.device_count():
        raise DeviceError(f"--gpu {index}: this machine has {torch.cuda.device_count()} CUDA device(s) (0..{torch.cuda.device_count() - 1}); pick one of them or --gpu cpu")
    return _cuda(index, auto=False)


def _cpu(auto: bool) -> DeviceInfo:
    try:
        import os

        pages, page_size = os.sysconf("SC_AVPHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        free = pages * page_size
    except (ValueError, OSError, AttributeError):
        free = 0
    return DeviceInfo(torch.device("cpu"), "cpu", free, auto)


def _cuda(index: int, auto: bool) -> DeviceInfo:
    free, total = torch.cuda.mem_get_info(index)
    name = torch.cuda.get_device_name(index)
    return DeviceInfo(torch.device("cuda", index), f"cuda:{index} ({name}, {total / 2**30:.1f} GiB)", free, auto)
