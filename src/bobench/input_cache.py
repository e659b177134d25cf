"""Pre-resized uint8 inputs: decode and resize a dataset once, reuse it for every backbone that resizes alike.

A backbone's evaluation transform (timm's and torchvision's) is ``[resize / crop ops on the PIL image...,
ToTensor, Normalize]``. Everything before ``ToTensor`` depends only on the image and the resize and crop, so
its output, one uint8 ``[H, W, 3]`` array per image, is stored once per (dataset, resize and crop) and read
back for every backbone that resizes and crops alike (most ImageNet models at 224 px share one), whatever
their mean and std. Reading an image is then a slice of a memory map instead of a decode and a resize; the
conversion to float and the normalisation run on the whole batch on the extraction's device
(:class:`Normalise`), so a GPU receives uint8 (a quarter of float32's bytes) and normalises it itself.

**Exactness.** :class:`Normalise` applies torchvision's float32 operations in their order (``x / 255``, then
``(x - mean) / std``) as true divisions by tensors on the batch's device (never a multiplication by a
reciprocal, which CUDA uses for a CPU scalar divisor), so the model sees the numbers the ordinary path gives
it and the features share the ordinary path's cache key. Tests check the features for equality.

Layout under ``root`` (``<feature cache>/inputs``)::

    <key>/manifest.json       # key fields, image shape, shards done, build stats
    <key>/shard-00000.npy     # uint8 [n_i, H, W, 3]: images [i*S, (i+1)*S)
    <key>.lock                # held by the one process building this key

**Filling it.** On the CPU the first backbone's extraction waits for one separate pass that decodes with every
core (the forward would compete with the decoders for them). On an accelerator that pass would leave the
device idle, so the first extraction decodes in its own DataLoader workers as the ordinary path does, and
:class:`~bobench.input_stream.StreamedBuild` writes the shards from the batches the model receives (a thread does the writing):
the first backbone pays about what the ordinary path pays and the input cache comes with it.

The key covers the dataset's manifest hash, each resize / crop op's class and settings, the Pillow and
torchvision versions (they compute the resize) and :data:`FORMAT_VERSION`. Shards are written atomically
and a killed build resumes at the first missing one. A transform that does not split so (a custom callable,
an op not in :data:`GEOMETRIC_OPS`) is extracted the ordinary way; :func:`cached_inputs` says why.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock, Timeout
from torch.utils.data import Dataset

from bobench.files import atomic_save_npy, config_sha, read_manifest, write_manifest
from bobench.input_stream import StreamedBuild, shape_error

FORMAT_VERSION = 1  # bump when the layout or the meaning of a key component changes
SHARD_SIZE = 512  # images per shard file (77 MB at 224 px): the unit of resumption
#: device types on which an extraction decodes to uint8 in its workers and normalises on the device
#: (:func:`device_normalised`), and so the input cache's first fill streams (StreamedBuild)
NORMALISE_ON_DEVICE = frozenset({"cuda", "mps", "xpu"})
#: readers of the full input cache on an accelerator when the options name none (one reader held ResNet-50
#: at 4.6k img/s on an H200, four gave 6.7k: BENCHMARKS P5); the CPU reads as every CPU pass does
READERS = 4
#: resize / crop ops whose output depends only on the image and their public settings (no random draws)
GEOMETRIC_OPS = frozenset(
    {
        "torchvision.transforms.transforms.Resize",
        "torchvision.transforms.transforms.CenterCrop",
        "timm.data.transforms.ResizeKeepRatio",
        "timm.data.transforms.CenterCropOrPad",
        "timm.data.transforms.TrimBorder",
    }
)
_TO_TENSOR = frozenset({"torchvision.transforms.transforms.ToTensor", "timm.data.transforms.MaybeToTensor"})
_NORMALIZE = "torchvision.transforms.transforms.Normalize"


def _qualname(op: Any) -> str:
    return f"{type(op).__module__}.{type(op).__qualname__}"


def describe_op(op: Any) -> dict[str, Any]:
    """An op's class and public settings as plain data (what the key hashes)."""
    settings = {k: repr(v) for k, v in sorted(vars(op).items()) if not k.startswith("_") and k != "training"}
    return {"op": _qualname(op), **settings}


@dataclass(frozen=True)
class SplitTransform:
    """A transform split at ``ToTensor``: the PIL ops before it, and the normalisation after it."""

    geometric: tuple[Any, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]


def split_transform(transform: Any) -> SplitTransform | str:
    """``transform`` as :class:`SplitTransform`, or the reason it cannot be split (a string)."""
    ops = getattr(transform, "transforms", None)
    if _qualname(transform) != "torchvision.transforms.transforms.Compose" or not isinstance(ops, list):
        return f"the transform is a {type(transform).__name__}, not a torchvision Compose"
    if len(ops) < 2 or _qualname(ops[-2]) not in _TO_TENSOR or _qualname(ops[-1]) != _NORMALIZE:
        return "the transform does not end with ToTensor and Normalize"
    unknown = [type(op).__name__ for op in ops[:-2] if _qualname(op) not in GEOMETRIC_OPS]
    if unknown:
        return f"the transform has ops the input cache does not know: {', '.join(unknown)}"
    norm = ops[-1]
    mean = tuple(float(v) for v in torch.as_tensor(norm.mean, dtype=torch.float32).reshape(-1))
    std = tuple(float(v) for v in torch.as_tensor(norm.std, dtype=torch.float32).reshape(-1))
    return SplitTransform(tuple(ops[:-2]), mean, std)


class Normalise(torch.nn.Module):
    """uint8 ``[B, H, W, 3]`` -> float32 ``[B, 3, H, W]`` (a channels_last view of the input's layout), as
    torchvision's ``to_tensor`` then ``normalize`` compute each image: ``x / 255``, ``- mean``, ``/ std``."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.mean, self.std = tuple(mean), tuple(std)
        self._constants: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(255, mean, std)`` as float32 tensors on ``device``, made once per device (a copy to a GPU
        for every batch would make the host wait for it). Tensors, not Python scalars: CUDA turns a
        scalar divisor into a multiplication by its reciprocal, which rounds differently."""
        if device not in self._constants:
            self._constants[device] = (
                torch.tensor(255.0, dtype=torch.float32, device=device),
                torch.tensor(self.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1),
                torch.tensor(self.std, dtype=torch.float32, device=device).view(1, -1, 1, 1),
            )
        return self._constants[device]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected uint8 [B, H, W, 3], got {x.dtype} {tuple(x.shape)}")
        scale, mean, std = self.constants(x.device)
        return x.permute(0, 3, 1, 2).to(torch.float32).div(scale).sub_(mean).div_(std)


class _Decoded(Dataset):
    """``(uint8 [H, W, 3] tensor, index)`` of ``dataset``'s images after the resize / crop ops."""

    def __init__(self, dataset: Any, geometric: Sequence[Any]) -> None:
        self.dataset, self.geometric = dataset, tuple(geometric)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = self.dataset.load_image(i)  # a PIL RGB image, as the ordinary path's transform gets it
        for op in self.geometric:
            image = op(image)
        return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)), i


def _label(dataset: Any, i: int) -> Any:
    """Item ``i``'s label as the dataset's ``__getitem__`` gives it (an int, or float32 multi-label)."""
    target = dataset.targets[i]
    return torch.from_numpy(target.astype(np.float32)) if target.ndim else int(target)


class _DecodedLabelled(_Decoded):
    """``(uint8 [H, W, 3] tensor, label)``: what an extraction on an accelerator reads (``cached``: one that
    fills the input cache, :class:`~bobench.input_stream.StreamedBuild`)."""

    def __init__(self, dataset: Any, geometric: Sequence[Any], cached: bool) -> None:
        super().__init__(dataset, geometric)
        self.cached = cached

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Any]:  # type: ignore[override]
        return super().__getitem__(i)[0], _label(self.dataset, i)

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, Any]]:
        items = [self[i] for i in indices]
        for i, (image, _) in zip(indices, items, strict=True):  # before the collate's stack fails on them
            if image.shape != items[0][0].shape or image.ndim != 3 or image.shape[-1] != 3:
                raise shape_error(self.dataset, i, tuple(image.shape), tuple(items[0][0].shape), self.cached)
        return items


def _as_list(batch: list[tuple[torch.Tensor, int]]) -> tuple[list[torch.Tensor], list[int]]:
    return [image for image, _ in batch], [i for _, i in batch]


@dataclass
class InputSet:
    """A complete set of pre-resized inputs, memory-mapped (see the module docstring)."""

    key: str
    path: Path
    manifest: dict[str, Any]
    cache_hit: bool = False
    _shards: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_shards": {}}  # workers reopen the files, never copy the arrays

    @property
    def n(self) -> int:
        return int(self.manifest["n"])

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(H, W, 3)`` of every image."""
        return tuple(self.manifest["shape"])  # type: ignore[return-value]

    def shard(self, s: int) -> np.ndarray:
        if s not in self._shards:
            self._shards[s] = np.load(self.path / f"shard-{s:05d}.npy", mmap_mode="r")
        return self._shards[s]

    def rows(self, idx: Sequence[int]) -> np.ndarray:
        """uint8 ``[len(idx), H, W, 3]`` of images ``idx``, in that order (one read per shard touched)."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        size = int(self.manifest["shard_size"])
        out = np.empty((len(idx), *self.shape), np.uint8)
        for s in np.unique(idx // size):
            where = np.flatnonzero(idx // size == s)
            out[where] = self.shard(int(s))[idx[where] - s * size]
        return out


class CachedInputs(Dataset):
    """``dataset``'s items with the image replaced by its stored uint8 ``[H, W, 3]`` tensor (labels as the
    dataset gives them); ``__getitems__`` reads a whole batch at once."""

    def __init__(self, dataset: Any, inputs: InputSet) -> None:
        self.dataset, self.inputs = dataset, inputs

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Any]:
        return torch.from_numpy(self.inputs.rows([i])[0]), _label(self.dataset, i)

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, Any]]:
        rows = torch.from_numpy(self.inputs.rows(indices))
        return [(rows[b], _label(self.dataset, i)) for b, i in enumerate(indices)]


class InputStore:
    """The on-disk store of pre-resized inputs (see the module docstring)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def key_fields(dataset: Any, geometric: Sequence[Any]) -> dict[str, Any]:
        """Everything that changes the stored pixels, as plain data."""
        import PIL
        import torchvision

        return {
            "format": FORMAT_VERSION,
            "dataset": dataset.manifest_hash,
            "ops": [describe_op(op) for op in geometric],
            "pillow": PIL.__version__,
            "torchvision": torchvision.__version__,
        }

    def streamed(
        self, dataset: Any, geometric: Sequence[Any], shard_size: int | None = None
    ) -> StreamedBuild | None:
        """A :class:`StreamedBuild` of ``dataset`` under ``geometric``, holding the key's lock; None when the
        key has a manifest (complete: a hit; partial: :meth:`get_or_build` resumes it) or another process
        is building it."""
        fields = self.key_fields(dataset, geometric)
        key = config_sha(fields)
        lock = self._try_lock(key)
        if lock is None:
            return None
        if read_manifest(self.root / key) is not None:
            lock.release()
            return None
        return StreamedBuild(key, fields, self.root / key, dataset, lock, shard_size or SHARD_SIZE)

    def building(self, dataset: Any, geometric: Sequence[Any]) -> bool:
        """Whether another process holds the lock of ``dataset`` under ``geometric`` (is building it)."""
        lock = self._try_lock(config_sha(self.key_fields(dataset, geometric)))
        if lock is None:
            return True
        lock.release()
        return False

    def _lock(self, key: str) -> FileLock:
        """The lock of ``key``, held by the one process building it."""
        return FileLock(str(self.root / f"{key}.lock"))

    def _try_lock(self, key: str) -> FileLock | None:
        """``key``'s lock, acquired, or None when another process holds it (never waits)."""
        lock = self._lock(key)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return None
        return lock

    def get_or_build(
        self, dataset: Any, geometric: Sequence[Any], workers: int, progress: bool = False,
        shard_size: int = SHARD_SIZE,
    ) -> InputSet:  # fmt: skip
        """The stored inputs of ``dataset`` under ``geometric``, decoding (or resuming) what is missing."""
        fields = self.key_fields(dataset, geometric)
        key = config_sha(fields)
        folder = self.root / key
        with self._lock(key):
            manifest = read_manifest(folder)
            if manifest is not None and manifest.get("complete"):
                return InputSet(key, folder, manifest, cache_hit=True)
            folder.mkdir(exist_ok=True)
            n = len(dataset)
            manifest = manifest or {"key": key, "key_fields": fields, "n": n, "shard_size": shard_size}
            manifest.update(complete=False, shards=sorted(manifest.get("shards", [])))
            size = int(manifest["shard_size"])
            done = {s for s in manifest["shards"] if (folder / f"shard-{s:05d}.npy").is_file()}
            todo = [s for s in range(-(-n // size)) if s not in done]
            t0 = time.perf_counter()
            for s, rows in _decode(dataset, geometric, todo, size, workers, progress):
                if "shape" not in manifest:
                    manifest["shape"] = list(rows.shape[1:])
                atomic_save_npy(folder / f"shard-{s:05d}.npy", rows)
                manifest["shards"] = sorted({*manifest["shards"], s})
                write_manifest(folder, manifest)
            manifest.setdefault("shape", [0, 0, 3])
            manifest.update(complete=True, build_s=time.perf_counter() - t0, resumed_shards=len(done))
            write_manifest(folder, manifest)
            return InputSet(key, folder, manifest, cache_hit=not todo)


def _decode(dataset: Any, geometric: Sequence[Any], todo: list[int], size: int, workers: int, progress: bool):
    """Yield ``(shard, uint8 rows)`` for each shard in ``todo``, decoding with ``workers`` processes."""
    from torch.utils.data import DataLoader, Subset

    from bobench.data.errors import worker_errors_unwrapped
    from bobench.progress import progress_bar

    n = len(dataset)
    indices = [i for s in todo for i in range(s * size, min((s + 1) * size, n))]
    loader = DataLoader(
        Subset(_Decoded(dataset, geometric), indices),
        batch_size=min(32, size),
        num_workers=workers,
        collate_fn=_as_list,
    )
    pending: dict[int, list[tuple[int, torch.Tensor]]] = {}
    shape: tuple[int, ...] | None = None
    with (
        progress_bar("resize once (input cache)", total=len(indices), enabled=progress) as bar,
        worker_errors_unwrapped(),
    ):
        for images, index in loader:
            for image, i in zip(images, index, strict=True):
                if shape is None:
                    shape = tuple(image.shape)
                if tuple(image.shape) != shape or len(shape) != 3 or shape[-1] != 3:
                    raise shape_error(dataset, i, tuple(image.shape), shape)
                pending.setdefault(i // size, []).append((i, image))
            bar.advance(len(index))
            for s in sorted(pending):
                if len(pending[s]) == min((s + 1) * size, n) - s * size:
                    rows = sorted(pending.pop(s), key=lambda t: t[0])
                    yield s, torch.stack([r for _, r in rows]).numpy()


def default_readers(device_type: str) -> int:
    """Workers that read the full input cache when the options name none: on an accelerator
    :data:`READERS`, at most one per spare core but at least one; on the CPU those of any CPU pass
    (:func:`~bobench.distributed.loader_workers`: none)."""
    from bobench.distributed import default_workers, loader_workers

    if device_type == "cpu":
        return loader_workers(None, device_type)
    return min(READERS, max(1, default_workers()))


def _splittable(dataset: Any) -> SplitTransform | str:
    """``dataset``'s transform split, or why its items cannot be made from ``load_image`` and the split."""
    from bobench.data.dataset import ImageDataset

    split = split_transform(dataset.transform)
    # an item must be exactly load_image -> transform: a subclass's own __getitem__ may do more
    if (
        not isinstance(split, str)
        and getattr(type(dataset), "__getitem__", None) is not ImageDataset.__getitem__
    ):
        return f"the dataset ({type(dataset).__name__}) does not give its images without the transform"
    return split


def device_normalised(dataset: Any) -> tuple[Any, Normalise | None]:
    """For an extraction on an accelerator without the input cache: a dataset of uint8 images (decoded,
    resized and cropped in the DataLoader workers) and the :class:`Normalise` to run on the device, or
    ``(dataset, None)`` when the transform does not split. The workers skip ToTensor and Normalize and the
    host copies a quarter of the bytes; the model sees the same numbers (BENCHMARKS P5)."""
    split = _splittable(dataset)
    if isinstance(split, str):
        return dataset, None
    return _DecodedLabelled(dataset, split.geometric, cached=False), Normalise(split.mean, split.std)


def cached_inputs(
    dataset: Any, root: str | Path, options: Any, device_type: str = "cpu", whole: bool = False
) -> tuple[Any, Callable[[torch.Tensor], torch.Tensor] | None, dict[str, Any], StreamedBuild | None]:
    """For an extraction of ``dataset`` (its ``transform`` the backbone's): the dataset to read, the batch
    conversion to apply on the device, what to record, and the streamed build to feed (or None).

    Returns ``(CachedInputs, Normalise, info, None)`` when the stored inputs are (made) complete here;
    ``(decoding dataset, Normalise, info, StreamedBuild)`` when the extraction on an accelerator
    (``device_type`` in :data:`NORMALISE_ON_DEVICE`) of every image (``whole``) is to fill a key nobody has
    started; ``(dataset, None, info, None)`` with ``info["reason"]`` when the transform does not split.
    ``options``: an extraction's options (``num_workers``, ``progress``).
    """
    split = _splittable(dataset)
    if isinstance(split, str):
        return dataset, None, {"used": False, "reason": split}, None
    from bobench.distributed import default_workers

    store, normalise = InputStore(root), Normalise(split.mean, split.std)
    sink = store.streamed(dataset, split.geometric) if whole and device_type in NORMALISE_ON_DEVICE else None
    if sink is not None:
        sink.info.update(used=True, key=sink.key[:16], hit=False, streamed=True)
        return _DecodedLabelled(dataset, split.geometric, cached=True), normalise, sink.info, sink
    if device_type in NORMALISE_ON_DEVICE and store.building(dataset, split.geometric):
        # another extraction is filling it as it runs: decode here rather than idle the device until it ends
        info = {"used": False, "reason": "another process is filling the input cache of this resize"}
        return _DecodedLabelled(dataset, split.geometric, cached=False), normalise, info, None
    # the build only decodes, the main process waits: it gets the main process's core as well
    workers = options.num_workers if options.num_workers is not None else default_workers() + 1
    inputs = store.get_or_build(dataset, split.geometric, workers, options.progress)
    info = {"used": True, "key": inputs.key[:16], "hit": inputs.cache_hit, "shape": list(inputs.shape)}
    if not inputs.cache_hit:
        info["build_s"] = inputs.manifest.get("build_s")
    return CachedInputs(dataset, inputs), normalise, info, None
