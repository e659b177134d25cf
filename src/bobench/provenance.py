"""Provenance: what a rerun needs to know about the code and machine that produced a result.

:func:`collect` is stored with every result row (see :mod:`bobench.store`); :func:`device_info` names the
device a cell ran on. Neither imports torch unless it has to: listing versions goes through
``importlib.metadata`` only.
"""

from __future__ import annotations

import copy
import functools
import os
import platform
import socket
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["LIBRARIES", "collect", "device_info"]

# Distributions (PyPI names) whose versions can change a score. Missing ones are left out, not errors.
LIBRARIES = (
    "torch",
    "torchvision",
    "timm",
    "numpy",
    "open_clip_torch",
    "transformers",
    "diffusers",
    "safetensors",
    "huggingface_hub",
    "scikit-learn",
    "scipy",
    "pandas",
    "pyarrow",
    "pillow",
    "pycocotools",
    "faster-coco-eval",
    "ray",
)

_PACKAGE_DIR = Path(__file__).resolve().parent
_GIT_TIMEOUT_S = 5.0


def collect() -> dict[str, Any]:
    """Describe the code and environment of this process.

    Computed once per process (git and metadata lookups are not free) and returned as a fresh copy, so
    callers may mutate the result.

    Returns:
        ``{"bobench_version": str, "git_hash": str, "python": str, "platform": str, "hostname": str,
        "library_versions": {dist_name: version}}``. ``bobench_version`` is ``"0+unknown"`` when bobench
        is not installed; ``git_hash`` is 40 hex digits, plus ``"-dirty"`` when tracked files have
        uncommitted changes, or ``""`` when bobench does not run from a git checkout.

    Example:
        >>> sorted(collect())
        ['bobench_version', 'git_hash', 'hostname', 'library_versions', 'platform', 'python']
    """
    return copy.deepcopy(_collect())


@functools.lru_cache(maxsize=1)
def _collect() -> dict[str, Any]:
    return {
        "bobench_version": _version("bobench") or "0+unknown",
        "git_hash": _git_hash(_PACKAGE_DIR),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "library_versions": {name: v for name in LIBRARIES if (v := _version(name))},
    }


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return ""


def _git(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    # GIT_OPTIONAL_LOCKS=0: `git status` would otherwise refresh (write) the index, racing a user's git.
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
    return subprocess.run(
        ["git", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=_GIT_TIMEOUT_S
    )


def _git_hash(package_dir: Path) -> str:
    """HEAD of the checkout ``package_dir`` is tracked in, ``-dirty`` if modified; ``""`` otherwise."""
    try:
        # An installed bobench can sit inside someone else's repository (a venv in a project): only
        # trust HEAD if the package's own files are tracked by it.
        if _git(["ls-files", "--error-unmatch", "."], package_dir).returncode != 0:
            return ""
        head = _git(["rev-parse", "HEAD"], package_dir)
        if head.returncode != 0:  # a repository without commits
            return ""
        # Untracked files do not count (as with `git describe --dirty`): an unignored venv or results
        # file would mark every run dirty, and scanning it can take seconds.
        status = _git(["status", "--porcelain", "--untracked-files=no"], package_dir)
    except (OSError, subprocess.SubprocessError):  # git missing, hung, or the directory vanished
        return ""
    dirty = status.returncode == 0 and bool(status.stdout.strip())
    return head.stdout.strip() + ("-dirty" if dirty else "")


def device_info(device: str) -> str:
    """Describe ``device`` for the results table, e.g. ``"cpu: AMD EPYC, 2 threads"``.

    Imports torch lazily (only for thread counts and CUDA names).

    Args:
        device: a torch device string: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``, ...

    Returns:
        ``"cpu: <model name>, <n> threads"``, ``"cuda:<i> <GPU name>"`` (``"cuda:<i> unavailable"`` if
        CUDA cannot be initialised here), ``"mps: <processor>"``, or ``device`` itself for other kinds.
    """
    device = str(device)
    kind, _, index = device.partition(":")
    if kind == "cpu":
        return f"cpu: {_cpu_name()}, {_cpu_threads()} threads"
    if kind == "cuda":
        idx = int(index) if index else 0
        try:
            import torch

            if torch.cuda.is_available() and idx < torch.cuda.device_count():
                return f"cuda:{idx} {torch.cuda.get_device_name(idx)}"
        except (ImportError, RuntimeError):
            pass
        return f"cuda:{idx} unavailable"
    if kind == "mps":
        return f"mps: {platform.processor() or platform.machine()}"
    return device


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # not Linux
        pass
    return platform.processor() or platform.machine() or "unknown"


def _cpu_threads() -> int:
    try:
        import torch

        return torch.get_num_threads()
    except ImportError:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
