"""Device and precision, chosen once at the edge and recorded with every feature set and result."""

from __future__ import annotations

import platform
import warnings
from dataclasses import dataclass

import torch

PRECISIONS = ("auto", "fp32", "fp16", "bf16")


@dataclass(frozen=True)
class Placement:
    """Where and how a backbone runs.

    Attributes:
        device: a torch device (``cpu``, ``cuda:0``, ``mps``).
        autocast: dtype for ``torch.autocast``, or None for plain fp32.
        precision: the resolved name (``fp32``, ``fp16``, ``bf16``), recorded in keys and results.
    """

    device: torch.device
    autocast: torch.dtype | None
    precision: str

    def autocast_context(self) -> torch.autocast:
        """An autocast context, disabled for fp32."""
        return torch.autocast(
            device_type=self.device.type,
            dtype=self.autocast or torch.float32,
            enabled=self.autocast is not None,
        )


def resolve_placement(device: str = "auto", precision: str = "auto") -> Placement:
    """Resolve ``--device auto|cpu|cuda[:N]|mps`` and ``--precision auto|fp32|fp16|bf16``.

    ``auto`` device picks CUDA, then Apple MPS, then the CPU. ``auto`` precision is mixed precision on
    accelerators (bf16 where the GPU supports it, else fp16) and fp32 on the CPU, where bf16 is opt-in
    (fast on CPUs with AMX/AVX512-BF16, slow elsewhere, and it changes the numbers).

    Raises:
        ValueError: an unknown precision, or a CUDA device on a machine without one.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if device == "auto":
        if torch.cuda.is_available():
            device = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but torch sees no CUDA GPU; use --device cpu or auto")
    if precision == "auto":
        if dev.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        elif dev.type == "mps":
            precision = "fp16"
        else:
            precision = "fp32"
    autocast = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    if dev.type == "cpu" and precision == "fp16":
        raise ValueError("fp16 autocast is not supported on the CPU; use bf16 or fp32")
    if dev.type == "cpu" and precision == "bf16" and cpu_bf16_native() is False:
        warnings.warn(
            "--precision bf16 on a CPU without AVX512-BF16 or AMX: bf16 is emulated there and runs several "
            "times slower than fp32 (BENCHMARKS.md P12); use --precision fp32 on this machine",
            RuntimeWarning,
            stacklevel=1,  # raised here, not at the caller: Python's default filter then says it once a process
        )
    return Placement(dev, autocast, precision)


def cpu_bf16_native() -> bool | None:
    """Whether this CPU runs bf16 matrix products natively (x86 AVX512-BF16 or AMX), per torch's own probe.

    None where that cannot be told (a CPU other than x86, or a torch without the probe): on an x86 CPU
    without either, oneDNN emulates bf16 and it is 5-9x slower than fp32 (measured, BENCHMARKS.md P12).
    """
    if platform.machine().lower() not in {"x86_64", "amd64", "i386", "i686"}:
        return None
    probes = [
        getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    ]
    if any(p is None for p in probes):
        return None
    return any(bool(p()) for p in probes)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window on ``device`` (CUDA only; the CPU's peak RSS cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory in MiB: on CUDA, allocated on ``device`` since the last :func:`reset_peak_memory`;
    elsewhere the process's peak resident set size so far (it never goes down)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    import sys

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return kb / 2**20 if sys.platform == "darwin" else kb / 2**10
