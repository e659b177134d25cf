"""One generic lazy registry.

Names map to ``"module:attr"`` strings (or objects) and metadata; the target is imported only on first
use, so listing names never imports torch. Unknown names raise :class:`UnknownNameError` with
did-you-mean suggestions. Plugins add entries through an entry-point group whose targets are
``register(registry)`` callables; built-ins use the very same hook.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any


class UnknownNameError(KeyError, ValueError):
    """Raised for a name that is not registered; the message lists close matches."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


def import_target(target: str) -> Any:
    """Import ``"package.module:attr.sub"`` and return the attribute.

    Raises:
        ImportError: naming the module or the missing attribute.
    """
    module_name, sep, attr_path = target.partition(":")
    if not sep or not module_name or not attr_path:
        raise ValueError(f"{target!r} is not of the form 'module:attr'")
    module = importlib.import_module(module_name)
    obj: Any = module
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise ImportError(f"module {module_name!r} has no attribute {attr_path!r}") from exc
    return obj


def suggest(name: str, choices: list[str], n: int = 3) -> str:
    """Return ``" Did you mean: a, b?"`` for close matches of ``name`` in ``choices`` (or "")."""
    close = difflib.get_close_matches(name, choices, n=n, cutoff=0.5)
    if not close:
        lowered = name.lower()
        close = [c for c in choices if lowered in c.lower()][:n]
    return f" Did you mean: {', '.join(close)}?" if close else ""


@dataclass
class Entry:
    """One registered name: a lazy target plus free-form metadata (never requires an import)."""

    name: str
    target: str | Any
    meta: dict[str, Any] = field(default_factory=dict)


class Registry(Mapping[str, Entry]):
    """A name → entry mapping with lazy imports and plugin discovery.

    Args:
        kind: what the names are ("backbone", "dataset", ...), used in error messages.
        group: entry-point group scanned once, on first lookup, for ``register(registry)`` hooks.
        list_command: the real CLI command that lists the names (e.g. ``bobench backbones list``),
            named in the unknown-name error; None lists the names in the error itself.

    Example:
        >>> reg = Registry("thing")
        >>> reg.register("json-dumps", "json:dumps", doc="serialise")
        >>> reg.load("json-dumps")({"a": 1})
        '{"a": 1}'
    """

    def __init__(self, kind: str, group: str | None = None, list_command: str | None = None) -> None:
        self.kind = kind
        self.group = group
        self.list_command = list_command
        self._entries: dict[str, Entry] = {}
        self._plugins_loaded = group is None

    # -- registration -------------------------------------------------------------------------
    def register(self, name: str, target: str | Any, *, overwrite: bool = False, **meta: Any) -> None:
        """Register ``name``; a second registration of a name raises unless ``overwrite``."""
        if name in self._entries and not overwrite:
            raise ValueError(f"{self.kind} {name!r} is already registered (pass overwrite=True to replace)")
        self._entries[name] = Entry(name, target, dict(meta))

    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for ep in sorted(entry_points(group=self.group), key=lambda e: (e.name != "bobench", e.name)):
            hook: Callable[[Registry], None] = ep.load()
            hook(self)

    # -- lookup -------------------------------------------------------------------------------
    def entry(self, name: str) -> Entry:
        """Return the entry for ``name`` or raise :class:`UnknownNameError` with suggestions."""
        self._load_plugins()
        try:
            return self._entries[name]
        except KeyError:
            hint = suggest(name, list(self._entries))
            where = (
                f"List them with `{self.list_command}`."
                if self.list_command
                else f"Known {self.kind}s: {', '.join(sorted(self._entries)) or 'none'}."
            )
            raise UnknownNameError(f"unknown {self.kind} {name!r}.{hint} {where}") from None

    def load(self, name: str) -> Any:
        """Return the target of ``name``, importing it on first use."""
        entry = self.entry(name)
        if isinstance(entry.target, str):
            entry.target = import_target(entry.target)
        return entry.target

    def __getitem__(self, name: str) -> Entry:
        return self.entry(name)

    def __contains__(self, name: object) -> bool:
        self._load_plugins()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        self._load_plugins()
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        self._load_plugins()
        return len(self._entries)
