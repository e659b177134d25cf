"""Cache hits of ``bobench features extract`` that never build the model: the light-key index.

The feature cache key needs the built backbone (its ``weights_digest`` hashes the loaded parameters),
so until now a cached re-run imported torch and timm and built the model only to find its key. Here a
run that extracted (or found) features records, beside the cache, the *light key* of that run (a
sha256 of what the build and the dataset read, see :mod:`bobench.light_inputs`) and the full key it
produced. A later run with the same light key reads the full key from that record, and returns the
cached feature set without importing timm or building anything (and without torch on a CPU machine).

Layout under the feature cache root::

    light-index/keys/<light key>.json   # {"key": full cache key, "light": the light key's fields}
    light-index/files/<path hash>.json  # a weights file's sha256 by device, inode, size, mtime, ctime

Why a hit is as safe as the full key:

* the full key is unchanged (existing caches stay valid); the record only says which one it is;
* a record is written by a run that computed the full key the old way, and only when the inputs it
  describes were the same before the build and after the extraction, the torch-free dataset hash equals
  the real manifest hash, and the torch-free placement equals the one in the key;
* the light key covers what decides the full key besides those checked values: bobench's sources,
  every installed distribution, the CPU, the zoo entry, the spec, ``pretrained``, the init seed, the
  sha256 of the weights file, ``image_size``, the dataset's manifest hash, the device type and precision;
* on a hit, the cached manifest's own key fields must hash to the key and hold the same dataset hash,
  device type and precision.

What it assumes, which the full key does not:

* building a model is a function of those inputs (true of timm and torchvision models, whose init is
  seeded; other sources, plugins and user callables always take the full path); an installed library
  is known by its ``dist-info`` entry (name, version, install time), so a file of site-packages edited
  by hand, without a reinstall, goes unseen (bobench's own sources are hashed by content);
* a weights file whose device, inode, size, mtime and ctime are unchanged has unchanged bytes (see
  :func:`~bobench.light_inputs.file_digest`: an in-place edit that restores the size and the mtime
  still changes the ctime, which no system call sets back), as the dataset manifest hash already assumes
  of images with unchanged size and mtime;
* on Linux, torch sees no GPU when no NVIDIA, ROCm or WSL device node exists (``--device auto`` is
  resolved without torch only then; elsewhere torch resolves it).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bobench.features import ExtractOptions, FeatureSet, FeatureStore
from bobench.files import atomic_write_bytes, config_sha
from bobench.light_inputs import backbone_inputs, dataset_hash, environment, placement

__all__ = ["INDEX_DIR", "LIGHT_FORMAT", "LightHit", "LightIndex", "LightRecorder", "LightRequest"]

INDEX_DIR = "light-index"
LIGHT_FORMAT = 1  # bump when what a light key covers changes


@dataclass(frozen=True)
class LightRequest:
    """One ``features extract`` invocation: :func:`~bobench.backbones.create_backbone`'s arguments, the
    dataset spec and the extraction options."""

    backbone: str
    dataset: Any
    options: ExtractOptions
    pretrained: bool = True
    weights: str | os.PathLike | None = None
    init_seed: int = 0


@dataclass(frozen=True)
class LightHit:
    """A split found through the index: its feature set and the seconds it took once the dataset's hash
    was known (as the full path times ``get_or_extract`` once the dataset is loaded)."""

    split: str
    features: FeatureSet
    seconds: float


def _debug() -> bool:
    return bool(os.environ.get("BOBENCH_DEBUG"))


class LightIndex:
    """The light-key index of one :class:`~bobench.features.FeatureStore`."""

    def __init__(self, store: FeatureStore) -> None:
        self.store = store
        self.dir = store.root / INDEX_DIR

    @property
    def memo_dir(self) -> Path:
        """Where weights-file digests are remembered (see :func:`~bobench.light_inputs.file_digest`)."""
        return self.dir / "files"

    def record_path(self, light_key: str) -> Path:
        return self.dir / "keys" / f"{light_key}.json"

    def state(self, request: LightRequest) -> tuple[dict, dict, tuple[str, str]] | None:
        """``(environment, backbone inputs, (device type, precision))`` of ``request``, or None."""
        inputs = backbone_inputs(
            request.backbone, request.pretrained, request.weights, self.memo_dir, request.init_seed
        )
        if inputs is None:
            return None
        place = placement(request.options.device, request.options.precision)
        if place is None:
            return None
        return environment(), inputs, place

    @staticmethod
    def fields(
        env: dict, inputs: dict, image_size: int | None, dataset: str, place: tuple[str, str]
    ) -> dict[str, Any]:
        """The light key's fields (their :func:`~bobench.files.config_sha` is the light key)."""
        return {
            "format": LIGHT_FORMAT,
            "environment": config_sha(env),
            "backbone": inputs,
            "image_size": image_size,
            "dataset": dataset,
            "device_type": place[0],
            "precision": place[1],
        }

    # -- the hit path ---------------------------------------------------------------------------
    def lookup(self, request: LightRequest, splits: list[str]) -> list[LightHit] | None:
        """Every split's cached feature set without building the backbone, or None if any one misses
        (or cannot be decided here): the caller then takes the full path."""
        try:
            state = self.state(request)
            if state is None:
                return None
            env, inputs, place = state
            hits = []
            for split in splits:
                digest = dataset_hash(request.dataset, split)  # what load_dataset would cost
                if digest is None:
                    return None
                t0 = time.perf_counter()  # then, as on the full path, the time to get the features
                found = self._find(env, inputs, place, request.options.image_size, digest)
                if found is None:
                    return None
                hits.append(LightHit(split, found, time.perf_counter() - t0))
            return hits
        except Exception:
            if _debug():
                raise
            return None

    def _find(self, env, inputs, place, image_size: int | None, digest: str) -> FeatureSet | None:
        light_key = config_sha(self.fields(env, inputs, image_size, digest, place))
        try:
            record = json.loads(self.record_path(light_key).read_text())
        except (OSError, ValueError):
            return None
        found = self.store.get(str(record.get("key")))
        if found is None:
            return None
        key_fields = found.manifest.get("key_fields") or {}
        consistent = (
            config_sha(key_fields) == found.key
            and key_fields.get("dataset") == digest
            and (key_fields.get("device_type"), key_fields.get("precision")) == place
        )
        return found if consistent else None

    # -- the full path --------------------------------------------------------------------------
    def recorder(self, request: LightRequest) -> LightRecorder:
        """Call before building the backbone; :meth:`LightRecorder.remember` after each split."""
        return LightRecorder(self, request)


class LightRecorder:
    """Records what one full run found, when it can vouch for it (see the module docstring)."""

    def __init__(self, index: LightIndex, request: LightRequest) -> None:
        self.index = index
        self.request = request
        try:
            self.before = index.state(request)  # before the build reads anything
        except Exception:
            if _debug():
                raise
            self.before = None

    def remember(self, split: str, dataset: Any, features: FeatureSet) -> bool:
        """Record ``split``'s light key → ``features.key``; False (nothing written) when unsure.

        Args:
            split: the split name. dataset: the loaded dataset (its real ``manifest_hash``).
            features: what :meth:`~bobench.features.FeatureStore.get_or_extract` returned for it.
        """
        if self.before is None or not features.manifest.get("complete"):
            return False
        try:
            return self._remember(split, dataset, features)
        except Exception:
            if _debug():
                raise
            return False

    def _remember(self, split: str, dataset: Any, features: FeatureSet) -> bool:
        if self.index.state(self.request) != self.before:  # a file, the code or the zoo changed meanwhile
            return False
        env, inputs, place = self.before
        key_fields = features.manifest.get("key_fields") or {}
        digest = dataset_hash(self.request.dataset, split)
        if (
            digest is None
            or digest != dataset.manifest_hash
            or key_fields.get("dataset") != digest
            or (key_fields.get("device_type"), key_fields.get("precision")) != place
            or config_sha(key_fields) != features.key
        ):
            return False
        fields = self.index.fields(env, inputs, self.request.options.image_size, digest, place)
        path = self.index.record_path(config_sha(fields))
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps({"key": features.key, "light": fields}, indent=1).encode())
        return True
