"""Content-addressed feature cache: every frozen-feature task pays for one forward pass.

Layout under ``root``::

    <key>/manifest.json           # what produced the features, which shards are done, throughput
    <key>/shard-00000.npy         # float32 [n_i, D] features of samples [i*S, (i+1)*S)
    <key>/shard-00000.labels.npy  # int64 [n_i]
    <key>.lock                    # held by the one process extracting this key

The key is a sha256 over everything that changes the numbers: the backbone's weights digest (a hash
of its parameters, so a random init's seed is in it too), its spec, the resolved preprocessing, what is
cached (the pooled embedding) and its pooling, the dataset manifest hash (files, labels, split), the precision and the device type.
Change any of them and the key changes: a stale hit is impossible by construction.

Importing this module does not import torch (extraction does), so reading a cached feature set stays
cheap; see :mod:`bobench.light_index` for the cache hits of ``bobench features extract`` that never
build the model.

Every file is written to a temporary name and renamed, so a killed extraction leaves only whole
shards; the next run resumes at the first missing shard. A file lock serialises writers of one key,
so two processes extracting the same features never corrupt them: the second waits and then reads.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from filelock import FileLock

from bobench.chunking import ChunkedForward
from bobench.files import atomic_save_npy, config_sha, read_manifest, write_manifest
from bobench.files import atomic_write_bytes as atomic_write_bytes  # re-exported: its old home
from bobench.options import RunOptions

if TYPE_CHECKING:
    import torch

    from bobench.device import Placement

FORMAT_VERSION = 1  # bump when the on-disk layout or the meaning of a key component changes


def default_cache_dir() -> Path:
    """``$BOBENCH_CACHE/features``, else ``~/.cache/bobench/features``."""
    base = os.environ.get("BOBENCH_CACHE") or Path.home() / ".cache" / "bobench"
    return Path(base) / "features"


@dataclass(frozen=True)
class ExtractOptions:
    """How to run an extraction: the run options (:class:`~bobench.options.RunOptions`) plus what is
    particular to extraction. Only ``image_size`` and the resolved device type and precision enter
    the cache key; batch size, workers and shard size never change the numbers.

    Attributes:
        device: ``auto`` | ``cpu`` | ``cuda[:N]`` | ``mps``.
        precision: ``auto`` (mixed precision on GPUs, fp32 on CPU) | ``fp32`` | ``fp16`` | ``bf16``.
        batch_size: images per loader batch (see ``forward_chunk``).
        num_workers: DataLoader workers (None: on the CPU none, the main process loads between forwards;
            on an accelerator one per spare core, at most 8, and four reading a full input cache).
        image_size: override the card's input size (e.g. 64 or 112 px in tests).
        shard_size: samples per shard file (the unit of resumption).
        forward_chunk: images per model call (:mod:`bobench.chunking`): None takes cache-sized chunks on the
            CPU (at most 2^18 input pixels, e.g. 4 images at 224 px; the same on every run) and the whole
            batch on accelerators; an integer fixes it; ``"search"`` measures the fastest on the CPU.
            Halved on out-of-memory in every case. Recorded in the stats.
        channels_last: None lets the backbone decide (CNNs: yes).
        progress: show a progress bar (only on a terminal).
        input_cache: read the images pre-resized from :mod:`bobench.input_cache` (decoded and resized once
            per dataset and resize/crop, shared by backbones that resize alike); the same features. On an
            accelerator the first backbone fills it as it extracts.

    On an accelerator the workers stop after the resize and crop and the device converts and normalises
    each uint8 batch (:func:`bobench.input_cache.device_normalised`; the same features, recorded as
    ``normalised_on`` in the stats).
    """

    device: str = "auto"
    precision: str = "auto"
    batch_size: int = 64
    num_workers: int | None = None
    image_size: int | None = None
    shard_size: int = 8192
    forward_chunk: int | str | None = None
    channels_last: bool | None = None
    progress: bool = True
    input_cache: bool = False

    @classmethod
    def from_run(cls, options: RunOptions, **extra: Any) -> ExtractOptions:
        """The extraction options of ``options``, with ``extra`` (``image_size``, ``shard_size``) set."""
        return cls(
            device=options.device,
            precision=options.precision,
            batch_size=options.batch_size,
            num_workers=options.num_workers,
            channels_last=options.channels_last,
            progress=options.progress,
            input_cache=options.input_cache,
            forward_chunk=options.forward_chunk,
            **extra,
        )


@dataclass
class FeatureSet:
    """Features of one (backbone, dataset split) on disk, read through memory maps.

    Attributes:
        key: the cache key. path: its folder. manifest: the manifest dict.
        cache_hit: True when nothing had to be extracted in this call.
    """

    key: str
    path: Path
    manifest: dict[str, Any]
    cache_hit: bool = False
    _labels: np.ndarray | None = field(default=None, repr=False)

    @property
    def n(self) -> int:
        return int(self.manifest["n"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["dataset"]["classes"])

    @property
    def stats(self) -> dict[str, Any]:
        """Throughput of the extraction that produced these features (img/s, wall time, device...)."""
        return dict(self.manifest["stats"])

    def iter_shards(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(features [n_i, D] memory-mapped, labels [n_i])`` shard by shard, in sample order."""
        for s in self.manifest["shards"]:
            yield (
                np.load(self.path / s["file"], mmap_mode="r"),
                np.load(self.path / s["labels"]),
            )

    @property
    def labels(self) -> np.ndarray:
        if self._labels is None:
            self._labels = np.concatenate([lab for _, lab in self.iter_shards()])
        return self._labels

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """All features ``[N, D]`` float32 and labels ``[N]`` in RAM (for small and medium sets)."""
        feats = (
            np.concatenate([np.asarray(f) for f, _ in self.iter_shards()])
            if self.n
            else np.zeros((0, self.dim))
        )
        return feats.astype(np.float32, copy=False), self.labels


def extraction_memory_format(backbone: Any, options: RunOptions) -> torch.memory_format:
    """``channels_last`` where ``options`` ask for it, or (by default) where the backbone prefers it."""
    import torch

    channels_last = backbone.prefers_channels_last if options.channels_last is None else options.channels_last
    return torch.channels_last if channels_last else torch.contiguous_format


def extraction_loader(dataset: Any, options: RunOptions, placement: Placement) -> Any:
    """The in-order ``DataLoader`` an extraction pass reads ``dataset`` with: ``options.batch_size``,
    ``options.num_workers`` (default: :func:`~bobench.distributed.loader_workers`, none on the CPU), pinned
    memory for CUDA."""
    from torch.utils.data import DataLoader

    from bobench.distributed import loader_workers

    return DataLoader(
        dataset,
        batch_size=options.batch_size,
        shuffle=False,
        num_workers=loader_workers(options.num_workers, placement.device.type),
        pin_memory=placement.device.type == "cuda",
        persistent_workers=False,
    )


class FeatureStore:
    """The on-disk feature cache. See the module docstring for layout and guarantees.

    Example:
        >>> store = FeatureStore(tmp_path)
        >>> fs = store.get_or_extract(backbone, dataset, ExtractOptions(image_size=64))
        >>> X, y = fs.load()   # [N, D], [N]
    """

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()
        self.root.mkdir(parents=True, exist_ok=True)

    # -- keys -----------------------------------------------------------------------------------
    @staticmethod
    def key_fields(backbone: Any, dataset: Any, options: ExtractOptions, placement: Placement) -> dict:
        """Everything that changes the features, as plain data; :meth:`key` hashes it."""
        card = backbone.card
        return {
            "format": FORMAT_VERSION,
            "weights_digest": card.weights_digest,
            "spec": card.spec,
            "preprocess": backbone.preprocess(train=False, image_size=options.image_size),
            "layer": "embed",  # what is cached: the pooled embedding (dense maps will get their own key)
            "pool": card.pool,
            "dataset": dataset.manifest_hash,
            "precision": placement.precision,
            "device_type": placement.device.type,
        }

    def key(self, backbone: Any, dataset: Any, options: ExtractOptions | None = None) -> str:
        """The cache key of ``backbone`` on ``dataset`` under ``options``."""
        from bobench.device import resolve_placement

        options = options or ExtractOptions()
        placement = resolve_placement(options.device, options.precision)
        return config_sha(self.key_fields(backbone, dataset, options, placement))

    def get(self, key: str) -> FeatureSet | None:
        """A complete feature set for ``key``, or None."""
        manifest = read_manifest(self.root / key)
        if manifest is None or not manifest.get("complete"):
            return None
        return FeatureSet(key, self.root / key, manifest, cache_hit=True)

    # -- extraction -----------------------------------------------------------------------------
    def get_or_extract(
        self, backbone: Any, dataset: Any, options: ExtractOptions | None = None
    ) -> FeatureSet:
        """Return cached features, extracting (or resuming) whatever is missing first.

        Args:
            backbone: a :class:`~bobench.backbones.base.Backbone`. When features must be extracted it is
                moved to the chosen device (and to channels_last memory format for CNNs) and left there.
            dataset: an :class:`~bobench.data.ImageDataset` (its transform is not modified).
            options: see :class:`ExtractOptions`.
        """
        from bobench.device import resolve_placement

        options = options or ExtractOptions()
        placement = resolve_placement(options.device, options.precision)
        fields = self.key_fields(backbone, dataset, options, placement)
        key = config_sha(fields)
        hit = self.get(key)
        if hit is not None:
            return hit
        with FileLock(str(self.root / f"{key}.lock")):
            hit = self.get(key)  # another process may have finished it while we waited
            if hit is not None:
                return hit
            return self._extract(key, fields, backbone, dataset, options, placement)

    def _extract(self, key, fields, backbone, dataset, options, placement) -> FeatureSet:
        from bobench.device import peak_memory_mb
        from bobench.distributed import loader_workers

        folder = self.root / key
        folder.mkdir(exist_ok=True)
        n, size = len(dataset), options.shard_size
        n_shards = max(1, -(-n // size))
        manifest = read_manifest(folder) or {
            "key": key,
            "key_fields": fields,
            "n": n,
            "dim": backbone.card.embed_dim,
            "shard_size": size,
            "card": backbone.card.to_dict(),
            "dataset": {
                "spec": dataset.spec.to_dict() if hasattr(dataset.spec, "to_dict") else str(dataset.spec),
                "split": dataset.split,
                "classes": list(dataset.classes),
                "manifest_hash": dataset.manifest_hash,
            },
            "shards": [],
            "complete": False,
        }
        if manifest["shard_size"] != size:  # resume with the shard size the partial run used
            size = manifest["shard_size"]
            n_shards = max(1, -(-n // size))
        done = {s["index"] for s in manifest["shards"] if (folder / s["file"]).is_file()}
        manifest["shards"] = [s for s in manifest["shards"] if s["index"] in done]
        todo = [i for i in range(n_shards) if i not in done]
        ds = copy.copy(dataset)
        ds.transform = backbone.transform(train=False, image_size=options.image_size)
        indices = [j for i in todo for j in range(i * size, min((i + 1) * size, n))]
        t0 = time.perf_counter()
        prepare, inputs, sink = None, None, None
        if options.input_cache and indices:
            from bobench.input_cache import cached_inputs

            ds, prepare, inputs, sink = cached_inputs(
                ds, self.root / "inputs", options, placement.device.type, whole=len(indices) == n
            )
            if inputs["used"] and sink is None and options.num_workers is None:  # memory-map reads
                from bobench.input_cache import default_readers

                options = dataclasses.replace(options, num_workers=default_readers(placement.device.type))
        elif indices:
            from bobench.input_cache import NORMALISE_ON_DEVICE, device_normalised

            if placement.device.type in NORMALISE_ON_DEVICE:
                ds, prepare = device_normalised(ds)
        chunked = ChunkedForward(options.batch_size, placement.device.type, options.forward_chunk)
        for index, feats, labels in self._run(
            backbone, ds, indices, todo, size, n, options, placement, chunked, prepare, sink
        ):
            name = f"shard-{index:05d}"
            atomic_save_npy(folder / f"{name}.npy", feats)
            atomic_save_npy(folder / f"{name}.labels.npy", labels)
            manifest["shards"].append(
                {"index": index, "file": f"{name}.npy", "labels": f"{name}.labels.npy", "n": len(labels)}
            )
            manifest["shards"].sort(key=lambda s: s["index"])
            write_manifest(folder, manifest)
        wall = time.perf_counter() - t0
        manifest["complete"] = True
        manifest["stats"] = {
            "wall_time_s": wall,
            "n_extracted": len(indices),
            "img_per_s": len(indices) / wall if wall > 0 else None,
            "device": str(placement.device),
            "precision": placement.precision,
            "batch_size": options.batch_size,
            "loader_workers": loader_workers(options.num_workers, placement.device.type),
            **chunked.stats(),
            "peak_mem_mb": peak_memory_mb(placement.device),
            "resumed_shards": len(done),
            "input_cache": inputs,
            "normalised_on": "device" if prepare is not None else "workers",
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_manifest(folder, manifest)
        return FeatureSet(key, folder, manifest, cache_hit=not indices)

    @staticmethod
    def _overlapped(loader, forward) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(features on the CPU, labels)`` per batch, one batch behind the device.

        Copying a batch's features to the host waits for the device; doing it after the next batch's
        forward is queued keeps an accelerator busy during the copy and the host's bookkeeping (on
        the CPU it changes nothing).
        """
        pending = None
        for x, y in loader:
            emb = forward(x)
            if pending is not None:
                yield pending[0].cpu(), pending[1]
            pending = (emb, y)
        if pending is not None:
            yield pending[0].cpu(), pending[1]

    def _run(
        self, backbone, ds, indices, todo, size, n, options, placement, chunked, prepare=None, sink=None
    ):
        """Yield ``(shard index, features, labels)`` for each shard in ``todo``, in order; ``prepare`` turns
        a batch of the input cache's uint8 images into the model's input on the device; ``sink`` (a
        :class:`~bobench.input_cache.StreamedBuild`) stores each decoded batch as the input cache;
        ``chunked`` (a :class:`~bobench.chunking.ChunkedForward`) runs each batch through the model."""
        from contextlib import nullcontext

        import torch
        from torch.utils.data import Subset

        from bobench.data.errors import worker_errors_unwrapped
        from bobench.progress import progress_bar

        dim = backbone.card.embed_dim
        model = backbone.to(placement.device).eval()
        memory_format = extraction_memory_format(backbone, options)
        if memory_format == torch.channels_last:
            model = model.to(memory_format=memory_format)
        loader = extraction_loader(Subset(ds, indices), options, placement)
        shard_iter = iter(todo)
        current = next(shard_iter, None)
        buf_f: list[np.ndarray] = []
        buf_l: list[np.ndarray] = []
        filled = 0

        def embed(chunk: torch.Tensor) -> torch.Tensor:
            if prepare is not None:  # uint8 to the device, converted there
                chunk = prepare(chunk.to(placement.device, non_blocking=True))
            chunk = chunk.to(placement.device, non_blocking=True, memory_format=memory_format)
            with placement.autocast_context():
                return model.embed(chunk).float()

        def forward(x: torch.Tensor) -> torch.Tensor:
            outs = chunked(x, embed)
            return torch.cat(outs) if len(outs) > 1 else outs[0]

        with (
            torch.inference_mode(),
            progress_bar(
                f"extract {backbone.card.name}", total=len(indices), enabled=options.progress
            ) as bar,
            worker_errors_unwrapped(),
            sink if sink is not None else nullcontext(),
        ):
            for emb, y in self._overlapped(loader, forward if sink is None else sink.feeding(forward)):
                if emb.shape[-1] != dim:
                    raise RuntimeError(
                        f"{backbone.card.name}.embed returned dim {emb.shape[-1]}, card says {dim}"
                    )
                bar.advance(len(y))
                f_np, l_np = emb.numpy(), y.numpy().astype(np.int64)
                while len(l_np):
                    need = min((current + 1) * size, n) - current * size - filled
                    take = min(need, len(l_np))
                    buf_f.append(f_np[:take])
                    buf_l.append(l_np[:take])
                    filled += take
                    f_np, l_np = f_np[take:], l_np[take:]
                    if take == need:
                        yield current, np.concatenate(buf_f), np.concatenate(buf_l)
                        buf_f, buf_l, filled = [], [], 0
                        current = next(shard_iter, None)
        if n == 0 and current is not None:
            yield current, np.zeros((0, dim), np.float32), np.zeros(0, np.int64)
