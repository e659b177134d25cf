"""Cheap answers about a backbone before any work: does its name resolve, are its weights on disk?

Both run for every backbone of a battle in its preflight (:mod:`bobench.preflight`), so neither builds
a model nor downloads anything: a name is checked against the zoo and the source's model list, and
weights against the local caches (each source adapter's ``missing_weights``).
"""

from __future__ import annotations

from bobench.backbones.factory import BACKBONES, SOURCES, resolve_zoo_weights, unknown_backbone
from bobench.backbones.local_files import Missing
from bobench.backbones.weights import WeightsUnavailableError, network_available
from bobench.backbones.zoo import ZooEntry
from bobench.registry import UnknownNameError, import_target, suggest


def _zoo(name: str) -> ZooEntry | None:
    if name not in BACKBONES:
        return None
    target = BACKBONES.load(name)
    return target if isinstance(target, ZooEntry) else None


def check_name(name: str) -> None:
    """Raise when ``name`` can name no backbone; cheap (no model is built, no weights are read).

    Checks zoo names, ``random/`` prefixes, ``timm:`` / ``torchvision:`` / ``open_clip:`` architectures
    against the library's model list, and that a ``module:callable`` imports. ``hf:`` and
    ``diffusers:`` names are only checked when built (their configs live on the Hub).

    Raises:
        UnknownNameError: the name, with did-you-mean suggestions.
    """
    spec = name[len("random/") :] if name.startswith("random/") and name not in BACKBONES else name
    if spec in BACKBONES:
        return
    source, sep, rest = spec.partition(":")
    if sep and source in SOURCES:
        if not rest:
            raise UnknownNameError(f"backbone spec {name!r} names no model after '{source}:'")
        arch, models = _architectures(source, rest)
        if models is not None and arch not in models:
            raise UnknownNameError(
                f"{source} has no model {arch!r} (backbone {name!r}).{suggest(arch, models)}"
            )
        return
    if sep and ("." in source or source.isidentifier()):
        try:
            import_target(spec)
        except (ImportError, ValueError) as exc:
            raise UnknownNameError(f"backbone {name!r}: cannot import {spec!r} ({exc})") from None
        return
    raise unknown_backbone(spec)


def _architectures(source: str, rest: str) -> tuple[str, list[str] | None]:
    if source == "timm":
        import timm

        return rest.split(".")[0], timm.list_models()
    if source == "torchvision":
        import torchvision
        from torchvision.models import list_models

        return rest.split(".")[0], list_models(module=torchvision.models)
    if source == "open_clip":
        import open_clip

        return rest.split("/")[0], open_clip.list_models()
    return rest, None


def missing_weights(name: str) -> str | None:
    """Why ``name``'s weights cannot be had here, or None when they can (on disk, or downloadable).

    A random-init control and a user callable need no weights file (None). Weights that are not cached
    but whose host is reachable count as available: the run downloads them.
    """
    entry = _zoo(name)
    if entry is None and name.startswith("random/"):
        return None
    if entry is not None:
        if not entry.pretrained:
            return None
        if entry.weights:
            try:
                resolve_zoo_weights(entry, download=False)
            except WeightsUnavailableError as exc:
                url = entry.weights.get("url")
                if url and network_available(host=_host(url)):
                    return None
                return str(exc)
            return None
        spec = entry.spec
    elif name in BACKBONES:  # a plugin's factory: it loads its own weights
        return None
    else:
        spec = name
    source, sep, rest = spec.partition(":")
    if not (sep and source in SOURCES):
        return None  # a user callable loads its own weights
    check = SOURCES[source].meta.get("missing")
    if not check:
        return None
    missing: Missing | None = import_target(check)(rest)
    if missing is None or (missing.host and network_available(host=missing.host)):
        return None
    return f"{missing.what}, and {missing.host or 'its host'} cannot be reached (offline)"


def _host(url: str) -> str:
    from urllib.parse import urlparse

    return urlparse(url).hostname or url
