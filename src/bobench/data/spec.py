"""``DatasetSpec``: what to load, parsed once from a string, a dict or a YAML file, then frozen.

String grammar (options after ``?`` as ``key=value&...``)::

    patches13 | mnist5k | digits                  embedded datasets (also ``embedded:NAME``)
    imagefolder:/data/pets?val_fraction=0.2       a folder of class folders (optionally split folders)
    csv:/data/pets/manifest.csv                   a ``path,label[,split]`` manifest
    revisitop:/data/roxford5k                     a published layout read by a registered reader
                                                  (:mod:`bobench.data.readers`); reader options after ``?``
    /data/pets                                    an existing folder -> imagefolder
    /data/pets/manifest.csv                       a path ending ``.csv`` -> csv
    /data/pets.yaml                               a mapping with the fields below; ``path`` is relative
                                                  to the YAML file's folder
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from bobench.data.embedded import CATALOG
from bobench.data.errors import DatasetError
from bobench.data.readers import READERS, reader_options
from bobench.registry import suggest

KINDS: tuple[str, ...] = ("imagefolder", "csv", "embedded", *READERS)
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


@dataclass(frozen=True)
class DatasetSpec:
    """Which images to load and how to split them; hashable, and safe to put in a cache key.

    Attributes:
        kind: ``"imagefolder"``, ``"csv"`` or ``"embedded"``.
        name: the embedded dataset's name, or a display name (default: the folder's or CSV's name).
        path: absolute root folder (imagefolder) or manifest file (csv); ``None`` for embedded data.
        val_fraction: share of each class put in val when splits are made by seeded stratified splitting.
        test_fraction: share of each class put in test, likewise.
        seed: seed of that split.
        skip_bad_images: check every image header at load time and drop unreadable ones (counted in
            ``ImageDataset.n_skipped``) instead of failing when one is read.
        classes: declared class list, in label-index order; a label outside it is an error.
        options: reader-specific options (``(key, value)`` pairs, sorted), e.g. ``domain=real`` for
            ``visda``; only the keys the kind's reader declares are accepted.

    Embedded datasets have fixed splits, so they reject non-default ``val_fraction``, ``test_fraction``
    and ``seed`` rather than silently ignoring them.
    """

    kind: str
    name: str
    path: str | None = None
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    seed: int = 0
    skip_bad_images: bool = False
    classes: tuple[str, ...] | None = None
    options: tuple[tuple[str, str], ...] = ()

    def option(self, key: str, default: str | None = None) -> str | None:
        """The reader option ``key`` (see :mod:`bobench.data.readers`), or ``default``."""
        return dict(self.options).get(key, default)

    def __post_init__(self) -> None:
        if self.classes is not None and not isinstance(self.classes, tuple):
            object.__setattr__(self, "classes", tuple(self.classes))  # keep the frozen spec hashable
        if self.kind not in KINDS:
            raise DatasetError(
                f"unknown dataset kind {self.kind!r}.{suggest(self.kind, list(KINDS))} "
                f"Use one of {', '.join(KINDS)}."
            )
        if self.kind == "embedded":
            if self.name not in CATALOG:
                raise DatasetError(
                    f"unknown embedded dataset {self.name!r}.{suggest(self.name, list(CATALOG))} "
                    f"Embedded datasets: {', '.join(CATALOG)}."
                )
            if self.path is not None:
                raise DatasetError(f"embedded dataset {self.name!r} takes no path; drop 'path'.")
            defaults = {"val_fraction": 0.1, "test_fraction": 0.2, "seed": 0, "classes": None}
            changed = [k for k, v in defaults.items() if getattr(self, k) != v]
            if changed:
                raise DatasetError(
                    f"embedded dataset {self.name!r} has fixed splits and classes; drop {', '.join(changed)}."
                )
        elif not self.path:
            raise DatasetError(f"a {self.kind} dataset needs a path, e.g. '{self.kind}:/data/pets'.")
        for key in ("val_fraction", "test_fraction"):
            value = getattr(self, key)
            if not 0.0 <= value < 1.0:
                raise DatasetError(f"{key}={value} is out of range; use a number in [0, 1).")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise DatasetError(
                f"val_fraction + test_fraction = {self.val_fraction + self.test_fraction:g} leaves nothing "
                "to train on; keep their sum below 1."
            )
        if self.seed < 0:
            raise DatasetError(f"seed={self.seed} is negative; use an integer >= 0.")
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise DatasetError("the declared classes contain duplicates; list each class once.")

    @classmethod
    def parse(cls, spec: str | Mapping[str, Any] | DatasetSpec | os.PathLike[str]) -> DatasetSpec:
        """Build a validated spec from any accepted form (see the module docstring for the grammar).

        Args:
            spec: a spec string, a path, a mapping with the field names as keys, or a ``DatasetSpec``
                (returned unchanged).

        Returns:
            The frozen spec; ``path`` is made absolute, ``name`` defaults to the folder or file name.

        Raises:
            DatasetError: unknown kind, embedded name or key (with suggestions), or a bad value.

        Example:
            >>> DatasetSpec.parse("digits").to_dict()["kind"]
            'embedded'
        """
        if isinstance(spec, DatasetSpec):
            return spec
        if isinstance(spec, Mapping):
            return _from_mapping(dict(spec), origin="dataset spec", base=None)
        if isinstance(spec, os.PathLike):
            return _from_path(os.fspath(spec), options={}, origin=repr(os.fspath(spec)))
        if not isinstance(spec, str):
            raise DatasetError(
                f"a dataset spec must be a string, path or mapping, not {type(spec).__name__}."
            )
        return _from_string(spec)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (``classes`` as a list) that :meth:`parse` turns back into an equal spec."""
        out = asdict(self)
        out["classes"] = list(self.classes) if self.classes is not None else None
        out["options"] = dict(self.options)
        return out


_FIELDS = [f.name for f in fields(DatasetSpec)]


def _from_string(text: str) -> DatasetSpec:
    origin = f"dataset spec {text!r}"
    body, _, query = text.strip().partition("?")
    options = _parse_query(query, origin)
    prefix, sep, rest = body.partition(":")
    # A one-letter prefix is a Windows drive ("C:/data"), not a kind.
    if sep and len(prefix) > 1 and "/" not in prefix and "\\" not in prefix:
        if prefix not in KINDS:
            raise DatasetError(
                f"{origin}: unknown kind {prefix!r}.{suggest(prefix, list(KINDS))} "
                f"Use one of {', '.join(KINDS)}."
            )
        if prefix == "embedded":
            return _from_mapping({"kind": "embedded", "name": rest, **options}, origin, base=None)
        return _from_mapping({"kind": prefix, "path": rest, **options}, origin, base=None)
    if body in CATALOG:
        return _from_mapping({"kind": "embedded", "name": body, **options}, origin, base=None)
    return _from_path(body, options, origin)


def _from_path(path: str, options: dict[str, Any], origin: str) -> DatasetSpec:
    lowered = path.lower()
    if lowered.endswith((".yaml", ".yml")):
        return _from_yaml(Path(path), options)
    if lowered.endswith(".csv"):
        return _from_mapping({"kind": "csv", "path": path, **options}, origin, base=None)
    if os.path.isdir(os.path.expanduser(path)):
        return _from_mapping({"kind": "imagefolder", "path": path, **options}, origin, base=None)
    if "/" in path or os.sep in path or os.path.exists(path):
        raise DatasetError(
            f"{origin}: {path!r} is not an existing folder, a .csv manifest or a .yaml spec; "
            "check the path (a folder of class folders is read as imagefolder)."
        )
    raise DatasetError(
        f"{origin}: unknown dataset {path!r}.{suggest(path, list(CATALOG))} Embedded datasets: "
        f"{', '.join(CATALOG)}; or give imagefolder:/path, csv:/path/manifest.csv, a folder or a .yaml file."
    )


def _from_yaml(path: Path, options: dict[str, Any]) -> DatasetSpec:
    import yaml  # only YAML specs pay for this import

    if not path.is_file():
        raise DatasetError(f"dataset spec file {path} does not exist; check the path.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise DatasetError(f"{path} is not valid YAML ({exc}); fix the syntax.") from exc
    if not isinstance(data, Mapping):
        raise DatasetError(f"{path} must hold a mapping such as 'kind: imagefolder' and 'path: images'.")
    return _from_mapping({**data, **options}, origin=str(path), base=path.parent)


def _parse_query(query: str, origin: str) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for part in filter(None, query.split("&")):
        key, eq, value = part.partition("=")
        if not eq:
            raise DatasetError(f"{origin}: option {part!r} has no value; write it as key=value.")
        if key in options:
            raise DatasetError(f"{origin}: option {key!r} is given twice; give it once.")
        if key in ("kind", "path"):
            raise DatasetError(
                f"{origin}: {key!r} goes before the '?', e.g. 'imagefolder:/data/pets?seed=1'."
            )
        options[key] = value
    return options


def _from_mapping(data: dict[str, Any], origin: str, base: Path | None) -> DatasetSpec:
    data = dict(data)
    allowed_options = reader_options(str(data.get("kind")))
    nested = data.pop("options", None) or {}
    if not isinstance(nested, Mapping):
        raise DatasetError(f"{origin}: 'options' must be a mapping of reader options.")
    options = {**nested, **{k: data.pop(k) for k in list(data) if k in allowed_options}}
    bad = [k for k in options if k not in allowed_options]
    if bad:
        raise DatasetError(
            f"{origin}: option {bad[0]!r} is not one the {data.get('kind')} reader takes; it takes "
            f"{', '.join(allowed_options) or 'none'}."
        )
    unknown = [k for k in data if k not in _FIELDS]
    if unknown:
        key = str(unknown[0])
        raise DatasetError(
            f"{origin}: unknown key {key!r}.{suggest(key, _FIELDS)} Allowed keys: {', '.join(_FIELDS)}."
        )
    kind = data.get("kind")
    path = data.get("path")
    if path is not None:
        if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
            raise DatasetError(f"{origin}: 'path' must be a non-empty path string.")
        path = os.path.expanduser(os.fspath(path))
        path = os.path.abspath(base / path if base is not None else path)
    if kind is None:  # infer it the way a bare string would be read
        if data.get("name") in CATALOG and path is None:
            kind = "embedded"
        elif path is not None:
            kind = "csv" if path.lower().endswith(".csv") else "imagefolder"
        else:
            raise DatasetError(f"{origin}: give 'kind' ({', '.join(KINDS)}) or 'path'.")
    name = data.get("name")
    if name is None and kind == "embedded":
        raise DatasetError(f"{origin}: give 'name' (one of {', '.join(CATALOG)}) for an embedded dataset.")
    if name is None:  # a display name; a missing path is reported by DatasetSpec itself
        name = "" if path is None else Path(path).stem if kind == "csv" else os.path.basename(path)
    kwargs: dict[str, Any] = {"kind": str(kind), "name": str(name), "path": path}
    if options:
        kwargs["options"] = tuple(sorted((str(k), str(v)) for k, v in options.items()))
    try:
        for key in ("val_fraction", "test_fraction"):
            if key in data:
                kwargs[key] = _to_fraction(key, data[key])
        if "seed" in data:
            kwargs["seed"] = _to_int("seed", data["seed"])
        if "skip_bad_images" in data:
            kwargs["skip_bad_images"] = _to_bool("skip_bad_images", data["skip_bad_images"])
        if data.get("classes") is not None:
            kwargs["classes"] = _to_classes(data["classes"])
        return DatasetSpec(**kwargs)
    except DatasetError as exc:
        raise DatasetError(f"{origin}: {exc}") from None


def _to_fraction(key: str, value: Any) -> float:
    try:
        if isinstance(value, bool):
            raise TypeError
        number = float(value)
    except (TypeError, ValueError):
        raise DatasetError(
            f"{key}={value!r} is not a number; use a fraction in [0, 1) such as 0.1."
        ) from None
    if not math.isfinite(number):
        raise DatasetError(f"{key}={value!r} is not finite; use a fraction in [0, 1) such as 0.1.")
    return number


def _to_int(key: str, value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise DatasetError(f"{key}={value!r} is not an integer; use an integer >= 0.")


def _to_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise DatasetError(f"{key}={value!r} is not a boolean; use true or false.")


def _to_classes(value: Any) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(c, (str, int)) for c in items):
        raise DatasetError(f"classes={value!r} must be a list of names or a comma-separated string.")
    names = tuple(str(c).strip() for c in items)
    if not names or not all(names):
        raise DatasetError(f"classes={value!r} has an empty name; list non-empty class names.")
    return names
