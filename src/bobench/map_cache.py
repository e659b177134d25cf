"""Content-addressed cache of frozen backbone *maps*, so a frozen segmentation head trains at the cost of
one forward pass, as the pooled-feature probes do (:mod:`bobench.features`).

Layout under ``root`` (default ``$BOBENCH_CACHE/maps``, else ``~/.cache/bobench/maps``)::

    <key>/map{j}.npy      # [N, C_j, h_j, w_j] float16 (or float32): the j-th map the head reads
    <key>/masks.npy       # [N, S, S] uint8: the masks resized to the input size (nearest), 255 = ignore
    <key>/sizes.npy       # [N, 2] int64: each image's original (H, W)
    <key>/manifest.json   # what produced them, shapes, dtype, throughput; written last, "complete": true
    <key>.lock            # held by the one process (or thread) extracting this key

**Input.** Each image resized to ``S x S`` (:func:`~bobench.map_set.resize_for_maps`; the aspect ratio is
not kept); the maps are those of :meth:`~bobench.dense.segmentation.SegmentationModel.backbone_maps`, so
``model.forward_maps(mapset.batch(idx), (S, S))`` equals ``model(resized images)`` up to the storage
precision. Score on original masks by upsampling those ``S x S`` logits to ``sizes[i]``; not with
``forward_maps(maps, sizes[i])``, which resizes to the *padded* original size and crops, misplacing the
logits whenever ``sizes[i]`` is not a multiple of ``model.input_multiple`` (e.g. a ViT's patch).

**Key.** A sha256 over everything that changes the stored numbers: the format version, the backbone's
weights digest (a hash of its parameters, so a random init's seed is in it) and spec, the model's
normalisation mean and std and padding multiple, *which maps* (``model.in_index``: ``maps="last"`` and
``maps="all"`` are different entries), ``image_size`` and the resize rule, the dataset's manifest hash
(its files, labels and split) and split, the resolved precision and device type, and the storage dtype.
The head is not in it: a linear head and UPerNet reading the same maps share an entry. Change any
component and the key changes: a stale hit is impossible by construction.

**Atomicity.** Each array is written through ``np.lib.format.open_memmap`` into a temporary file in the
key's folder, filled batch by batch, flushed and renamed; the manifest (``"complete": true``) is written
last, atomically. A killed extraction never reads as complete; the next call starts that key
over (an entry is one file per map, so there is nothing partial worth resuming). A file lock serialises
writers of one key: a second process or thread asking for it waits, then reads the first one's result.

**Size.** An entry holds ``N * sum_j(C_j * h_j * w_j)`` values (2 bytes each in float16): e.g. a ViT-B/16
at 512 px keeps 32 x 32 x 768 values per image for ``maps="last"``, 1.5 MiB in float16, 30 GiB for
ADE20K's 20k training images. Free disk space is checked once the map shapes are known (a memory-mapped
write to a full disk would kill the process with SIGBUS instead of raising).
"""

from __future__ import annotations

import copy
import errno
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from filelock import FileLock

from bobench.chunking import ChunkedForward
from bobench.device import Placement, peak_memory_mb, resolve_placement
from bobench.distributed import loader_workers
from bobench.features import extraction_loader, extraction_memory_format
from bobench.files import config_sha, write_manifest
from bobench.map_set import (
    DTYPES,
    FORMAT_VERSION,
    IGNORE_INDEX,
    RESIZE_RULE,
    MapSet,
    ResizedForMaps,
    default_maps_dir,
    resize_for_maps,
)
from bobench.options import RunOptions

if TYPE_CHECKING:
    from bobench.dense.segmentation import SegmentationModel

__all__ = [
    "DTYPES",
    "FORMAT_VERSION",
    "IGNORE_INDEX",
    "RESIZE_RULE",
    "MapSet",
    "MapStore",
    "default_maps_dir",
    "resize_for_maps",
]
_FREE_MARGIN = 256 * 2**20  # leave this much free beyond an entry's size (manifest, other writers)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


class MapStore:
    """The on-disk cache of frozen segmentation maps. See the module docstring for layout and guarantees.

    Example:
        >>> store = MapStore(tmp_path)
        >>> ms = store.get_or_extract(build_segmenter(backbone, 21, head="linear"), dataset, image_size=512)
        >>> ms.maps(0).shape   # [N, C, 32, 32] float16, memory-mapped
    """

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root) if root is not None else default_maps_dir()
        self.root.mkdir(parents=True, exist_ok=True)

    # -- keys -----------------------------------------------------------------------------------
    @staticmethod
    def key_fields(
        model: SegmentationModel, dataset: Any, image_size: int, placement: Placement, dtype: str
    ) -> dict:
        """Everything that changes the stored maps and masks, as plain data; :meth:`key` hashes it.

        Raises:
            ValueError: an unknown ``dtype`` or a non-positive ``image_size``.
            TypeError: a dataset without ``manifest_hash``.
        """
        if dtype not in DTYPES:
            raise ValueError(f"map cache dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if isinstance(image_size, bool) or int(image_size) != image_size or image_size < 1:
            raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
        manifest_hash = getattr(dataset, "manifest_hash", None)
        if not manifest_hash:
            raise TypeError(
                f"{type(dataset).__name__} has no manifest_hash: the map cache keys entries by it "
                "(use a SegmentationDataset or give your view a hash of its items and their order)"
            )
        card = model.backbone.card
        return {
            "format": FORMAT_VERSION,
            "what": "segmentation-maps",
            "weights_digest": card.weights_digest,
            "spec": card.spec,
            "mean": [float(v) for v in model.mean.flatten().tolist()],
            "std": [float(v) for v in model.std.flatten().tolist()],
            "input_multiple": int(model.input_multiple),
            "in_index": [int(i) for i in model.in_index],
            "image_size": int(image_size),
            "resize": RESIZE_RULE,
            "dataset": manifest_hash,
            "split": getattr(dataset, "split", None),
            "precision": placement.precision,
            "device_type": placement.device.type,
            "dtype": dtype,
        }

    def key(
        self,
        model: SegmentationModel,
        dataset: Any,
        image_size: int,
        options: RunOptions | None = None,
        dtype: str = "float16",
    ) -> str:
        """The cache key of ``model``'s maps on ``dataset`` at ``image_size`` under ``options``."""
        options = options or RunOptions()
        placement = resolve_placement(options.device, options.precision)
        return config_sha(self.key_fields(model, dataset, image_size, placement, dtype))

    def get(self, key: str) -> MapSet | None:
        """The complete entry of ``key``, or None (missing, incomplete, or a file gone or of the wrong shape)."""
        folder = self.root / key
        try:
            manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        if not manifest.get("complete") or manifest.get("format") != FORMAT_VERSION:
            return None
        n, s = int(manifest["n"]), int(manifest["image_size"])
        expected = {m["file"]: (n, *m["shape"]) for m in manifest["maps"]}
        expected |= {"masks.npy": (n, s, s), "sizes.npy": (n, 2)}
        try:
            for name, shape in expected.items():  # reads the headers only
                if tuple(np.load(folder / name, mmap_mode="r").shape) != tuple(shape):
                    return None
        except (OSError, ValueError):
            return None
        return MapSet(key, folder, manifest, cache_hit=True)

    # -- extraction -----------------------------------------------------------------------------
    def get_or_extract(
        self,
        model: SegmentationModel,
        dataset: Any,
        image_size: int,
        options: RunOptions | None = None,
        dtype: str = "float16",
    ) -> MapSet:
        """The maps ``model`` reads for every item of ``dataset``, extracting them first on a miss.

        Args:
            model: a *frozen* :class:`~bobench.dense.segmentation.SegmentationModel`; its ``in_index``
                says which maps are cached. On a miss it is moved to the options' device (and its
                backbone to channels_last where that is preferred), and left there; its train/eval
                mode is restored afterwards.
            dataset: a :class:`~bobench.data.segmentation.SegmentationDataset` (or anything with
                ``len``, items ``(image float [3, H, W] in [0, 1], mask int [H, W])``, ``manifest_hash``
                identifying the items and their order, and optionally ``split`` and ``transforms``). A
                shallow copy with ``transforms = None`` is read: the caller's dataset is not modified,
                and its augmentation never enters the cache.
            image_size: the side ``S`` of the square input (see :func:`resize_for_maps`); a multiple of
                ``model.input_multiple`` wastes no padding.
            options: device, precision, batch size, workers, progress (default :class:`RunOptions`).
            dtype: storage dtype, ``"float16"`` (default) or ``"float32"``.

        Returns:
            a :class:`MapSet`; ``cache_hit`` says whether the backbone ran.

        Raises:
            ValueError: a backbone that is not frozen, an ``image_size`` a fixed-size backbone cannot
                take, an unknown dtype, maps too large for float16.
            OSError: too little free disk space for the entry (``errno.ENOSPC``; nothing is left behind).
            DatasetError: an unreadable item, with its own message (also from DataLoader workers).
        """
        if not getattr(model, "frozen", False):
            raise ValueError(
                "only a frozen backbone's maps can be cached: the maps of a backbone that trains change "
                "every step (build the segmenter with frozen=True)"
            )
        backbone = model.backbone
        if getattr(backbone, "fixed_input_size", False) and int(image_size) != int(
            backbone.card.input_size[-1]
        ):
            raise ValueError(
                f"{backbone.card.name} only runs at {backbone.card.input_size[-1]} px; "
                f"use image_size={backbone.card.input_size[-1]}"
            )
        options = options or RunOptions()
        placement = resolve_placement(options.device, options.precision)
        fields = self.key_fields(model, dataset, image_size, placement, dtype)
        key = config_sha(fields)
        hit = self.get(key)
        if hit is not None:
            return hit
        with FileLock(str(self.root / f"{key}.lock")):
            hit = self.get(key)  # another process or thread may have finished it while we waited
            if hit is not None:
                return hit
            return self._extract(key, fields, model, dataset, int(image_size), options, placement, dtype)

    def _extract(self, key, fields, model, dataset, size, options, placement, dtype) -> MapSet:
        folder = self.root / key
        folder.mkdir(exist_ok=True)
        # We hold the lock, so whatever is here is a killed or invalidated run's: start over. The
        # manifest goes first, so no reader can pair an old "complete" with new files.
        (folder / "manifest.json").unlink(missing_ok=True)
        for p in folder.iterdir():
            if p.is_file():
                p.unlink()
        ds = copy.copy(dataset)
        n = len(ds)
        if n == 0:
            raise ValueError(f"{getattr(dataset, 'source', dataset)}: no items to extract maps of")
        if hasattr(ds, "transforms"):
            ds.transforms = None  # eval view: augmentation must never be cached
        np_dtype = DTYPES[dtype]
        files = [f"map{j}.npy" for j in range(len(model.in_index))] + ["masks.npy", "sizes.npy"]
        tmp = {name: folder / f".{name[:-4]}.tmp-{os.getpid()}.npy" for name in files}
        arrays: dict[str, np.ndarray] = {}
        was_training = model.training
        t0 = time.perf_counter()
        chunked = ChunkedForward(options.batch_size, placement.device.type, options.forward_chunk)
        batches = self._run(model, ds, size, options, placement, np_dtype, chunked)
        try:
            written = 0
            for maps, masks, hw in batches:
                b = len(hw)
                if not arrays:  # the map shapes are known from the first batch on
                    shapes = [tuple(m.shape[1:]) for m in maps]
                    need = n * (
                        sum(int(np.prod(s)) for s in shapes) * np.dtype(np_dtype).itemsize + size * size + 16
                    )
                    free = shutil.disk_usage(folder).free
                    if need + _FREE_MARGIN > free:
                        raise OSError(
                            errno.ENOSPC,
                            f"caching the maps of {model.backbone.card.name} needs {_gib(need)} in {folder} "
                            f"but {_gib(free)} is free: free space, point BOBENCH_CACHE at a larger disk, "
                            "or cache fewer maps or a smaller image_size",
                        )
                    for j, s in enumerate(shapes):
                        arrays[files[j]] = np.lib.format.open_memmap(
                            tmp[files[j]], mode="w+", dtype=np_dtype, shape=(n, *s)
                        )
                    arrays["masks.npy"] = np.lib.format.open_memmap(
                        tmp["masks.npy"], mode="w+", dtype=np.uint8, shape=(n, size, size)
                    )
                    arrays["sizes.npy"] = np.lib.format.open_memmap(
                        tmp["sizes.npy"], mode="w+", dtype=np.int64, shape=(n, 2)
                    )
                for j, m in enumerate(maps):
                    arrays[files[j]][written : written + b] = m
                arrays["masks.npy"][written : written + b] = masks
                arrays["sizes.npy"][written : written + b] = hw
                written += b
            if written != n:
                raise RuntimeError(f"extracted {written} of {n} items of {getattr(ds, 'source', ds)}")
            shapes = [tuple(arrays[files[j]].shape[1:]) for j in range(len(model.in_index))]
            for name in files:
                arrays[name].flush()
            arrays.clear()  # close the maps before the rename
            for name in files:
                os.replace(tmp[name], folder / name)
        except BaseException:
            batches.close()  # stop the loader's workers now, not when the generator is collected
            arrays.clear()
            for p in tmp.values():
                p.unlink(missing_ok=True)
            raise
        finally:
            model.train(was_training)
        wall = time.perf_counter() - t0
        info = model.backbone.feature_info
        card = model.backbone.card
        manifest = {
            "key": key,
            "key_fields": fields,
            "format": FORMAT_VERSION,
            "complete": True,
            "n": n,
            "image_size": size,
            "dtype": dtype,
            "ignore_index": IGNORE_INDEX,
            "maps": [
                {"file": files[j], "index": int(i), "shape": list(shapes[j]), "stride": info[i].stride}
                for j, i in enumerate(model.in_index)
            ],
            "masks": "masks.npy",
            "sizes": "sizes.npy",
            "card": card.to_dict(),
            "dataset": {
                "source": getattr(dataset, "source", None),
                "kind": getattr(dataset, "kind", None),
                "split": getattr(dataset, "split", None),
                "classes": list(getattr(dataset, "classes", [])),
                "manifest_hash": dataset.manifest_hash,
            },
            "stats": {
                "wall_time_s": wall,
                "img_per_s": n / wall if wall > 0 else None,
                "device": str(placement.device),
                "precision": placement.precision,
                "batch_size": options.batch_size,
                "loader_workers": loader_workers(options.num_workers, placement.device.type),
                **chunked.stats(),
                "channels_last": extraction_memory_format(model.backbone, options) == torch.channels_last,
                "peak_mem_mb": peak_memory_mb(placement.device),
                "bytes": sum((folder / name).stat().st_size for name in files),
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
        }
        write_manifest(folder, manifest)
        return MapSet(key, folder, manifest, cache_hit=False)

    @staticmethod
    def _run(
        model: SegmentationModel,
        ds: Any,
        size: int,
        options: RunOptions,
        placement: Placement,
        np_dtype: type[np.floating],
        chunked: ChunkedForward,
    ) -> Iterator[tuple[list[np.ndarray], np.ndarray, np.ndarray]]:
        """Yield ``(maps on the CPU in the storage dtype, masks uint8, sizes)`` per batch, in item order;
        ``chunked`` runs each batch through the backbone."""
        from bobench.data.errors import worker_errors_unwrapped
        from bobench.progress import progress_bar

        backbone = model.backbone
        model.to(placement.device).eval()
        memory_format = extraction_memory_format(backbone, options)
        if memory_format == torch.channels_last:
            backbone.to(memory_format=memory_format)
        loader = extraction_loader(ResizedForMaps(ds, size), options, placement)
        store_dtype = torch.float16 if np_dtype is np.float16 else torch.float32

        def chunk_maps(chunk: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
            """One chunk's maps in the storage dtype (each chunk's full-precision maps are freed before the
            next runs) and its float16 overflow flag."""
            chunk = chunk.to(placement.device, non_blocking=True, memory_format=memory_format)
            with placement.autocast_context():
                maps = model.backbone_maps(chunk)
            stored = [m.to(store_dtype) for m in maps]
            overflow: torch.Tensor | None = None
            if store_dtype == torch.float16:
                for m, h in zip(maps, stored, strict=True):
                    o = (torch.isinf(h) & torch.isfinite(m)).any()
                    overflow = o if overflow is None else overflow | o
            return stored, overflow

        def forward(x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
            """Maps of ``x`` on the device, already in the storage dtype (half the copy to the host),
            and a flag tensor for float16 overflow (read one batch later, not to stall the device)."""
            chunks = chunked(x, chunk_maps)
            flags = [o for _, o in chunks if o is not None]
            overflow = torch.stack(flags).any() if flags else None
            if len(chunks) == 1:
                return chunks[0][0], overflow
            return [torch.cat(parts) for parts in zip(*(c[0] for c in chunks), strict=True)], overflow

        def host(pending: tuple) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
            maps, overflow, masks, hw = pending
            if overflow is not None and bool(overflow):
                raise ValueError(
                    f"{backbone.card.name}'s maps exceed float16's range (65504); cache them with "
                    'dtype="float32"'
                )
            return [m.cpu().numpy() for m in maps], masks.numpy(), hw.numpy()

        with (
            torch.inference_mode(),
            progress_bar(f"maps {backbone.card.name}", total=len(ds), enabled=options.progress) as bar,
            worker_errors_unwrapped(),
        ):
            # one batch behind the device: the host copy of batch i waits while batch i+1 is queued
            pending = None
            batches = iter(loader)
            try:
                for x, masks, hw in batches:
                    maps, overflow = forward(x)
                    if pending is not None:
                        yield host(pending)
                        bar.advance(len(pending[3]))
                    pending = (maps, overflow, masks, hw)
                if pending is not None:
                    yield host(pending)
                    bar.advance(len(pending[3]))
            finally:
                # An error's traceback keeps this frame, and so the loader's worker processes, alive
                # until it is collected; dropping the iterator here shuts them down now.
                del batches
