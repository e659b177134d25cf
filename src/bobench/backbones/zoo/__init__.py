"""Named backbones (the zoo): data, not code.

Entries live in the YAML files of this folder (and in any YAML file named by the environment variable
``BOBENCH_BACKBONES``, ``os.pathsep``-separated) and are registered through the ``bobench.backbones``
entry-point group, exactly as a plugin's would be. Reading them never imports torch.

For every pretrained entry a random-init control ``random/<architecture>`` is registered too, with the
same preprocessing, unless an entry of that name exists.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bobench.registry import Registry

ZOO_DIR = Path(__file__).parent
_ENTRY_KEYS = {"name", "description", "spec", "pretrained", "weights", "card"}
_WEIGHTS_KEYS = {"package", "file", "sha256", "url", "remap", "path"}
_CARD_LIST_KEYS = ("family", "pretraining", "pretraining_data", "input_size", "license")


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


def _arch(spec: str) -> str:
    source, _, rest = spec.partition(":")
    return rest.split(".")[0].split("/")[0] if source in {"timm", "torchvision"} else rest.replace("/", "-")


def read_zoo_file(path: Path) -> list[ZooEntry]:
    """Parse one zoo YAML file (a list of entries).

    Raises:
        ZooError: naming the file, the entry and the offending key.
    """
    try:
        raw = yaml.safe_load(path.read_text()) or []
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
        out.append(
            ZooEntry(
                name=str(item["name"]),
                spec=str(item["spec"]),
                pretrained=bool(item.get("pretrained", True)),
                description=str(item.get("description", "")),
                weights=weights,
                card=dict(item.get("card") or {}),
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
    return meta


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
                card={
                    k: v for k, v in e.card.items() if k not in {"pretraining", "pretraining_data", "license"}
                },
            )
            registry.register(name, ctrl, **_meta(ctrl))
