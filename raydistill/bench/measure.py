"""Measuring tools: passes per network, peak memory, timed steps, the machine the figures came from."""
from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor, nn


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PassCounter:
    """Forward and backward passes of each network while in a ``with`` block, given ``(name, module)``
    for every module that computes a network (``StepRunner.modules()``). ``forward`` counts calls of
    those modules; ``backward`` counts the gradients that arrive at the output of such a call (a hook
    on the output tensor), i.e. one per forward whose graph a backward runs through."""

    def __init__(self, modules: Iterable[tuple[str, nn.Module]]):
        self.counts: dict[str, dict[str, int]] = {}
        self.handles = []
        for name, module in modules:
            self.counts.setdefault(name, {"forward": 0, "backward": 0})
            self.handles.append(module.register_forward_hook(partial(self._forward, name)))

    def _forward(self, name: str, module, args, output) -> None:
        self.counts[name]["forward"] += 1
        if isinstance(output, Tensor) and output.requires_grad:
            output.register_hook(partial(self._backward, name))

    def _backward(self, name: str, grad: Tensor) -> None:
        self.counts[name]["backward"] += 1

    def __enter__(self) -> "PassCounter":
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()


class PeakMemory:
    """Peak memory in MiB of a ``with`` block: CUDA max_memory_allocated, or the CPU's RSS peak delta."""

    STATUS, CLEAR = "/proc/self/status", "/proc/self/clear_refs"

    def __init__(self, device: torch.device):
        self.device, self.mb, self.source = device, None, "unavailable"

    def _status_kb(self, key: str) -> int:
        with open(self.STATUS) as fh:
            return int(next(ln for ln in fh if ln.startswith(key + ":")).split()[1])

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.source = "torch.cuda.max_memory_allocated"
        else:
            try:
                with open(self.CLEAR, "w") as fh:
                    fh.write("5")  # resets VmHWM to the current RSS
                self.base_kb = self._status_kb("VmRSS")
                self.source = "cpu peak RSS - RSS before (VmHWM, /proc/self/clear_refs)"
            except OSError:
                self.base_kb = None
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            self.mb = torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        elif self.base_kb is not None:
            self.mb = (self._status_kb("VmHWM") - self.base_kb) / 1024


@dataclass
class Timing:
    images: int = 0
    step_s: float = 0.0
    data_s: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.step_s, 1e-9)

    @property
    def data_share(self) -> float:
        return self.data_s / max(self.data_s + self.step_s, 1e-9)


def run_steps(step: Callable[[Tensor, Tensor], Any], data: Iterator, n: int, device: torch.device) -> Timing:
    """``n`` steps on batches from ``data``, timing the batch draws and the steps apart."""
    t = Timing()
    for _ in range(n):
        t0 = time.perf_counter()
        x, y = next(data)
        sync(device)
        t1 = time.perf_counter()
        step(x, y)
        sync(device)
        t.data_s += t1 - t0
        t.step_s += time.perf_counter() - t1
        t.images += len(y)
    return t


def machine(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on (the load average shows whether the machine was busy)."""
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    info = {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "device": str(device),
            "load_avg": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None}
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), bf16=torch.cuda.is_bf16_supported())
    else:
        info.update(bf16=torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                    amx=torch.cpu._is_amx_tile_supported())
    return info
