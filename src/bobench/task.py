"""Tasks and suites: declarative YAML → validated, frozen configs, once, at the edge.

A task names a dataset, a protocol and its parameters, the metrics to keep, the seeds, and a
``version`` that is bumped (with a line in CHANGELOG.md) whenever a change would alter its scores.
A suite is a named list of backbones and tasks. Built-in tasks live in ``bobench/tasks/*.yaml`` and
suites in ``bobench/suites/*.yaml``; a path to a YAML file works wherever a name does.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from bobench.registry import suggest

TASK_DIR = Path(__file__).parent / "tasks"
_PLACEHOLDER = re.compile(r"\$\{([A-Za-z0-9_.-]+)\}")
SUITE_DIR = Path(__file__).parent / "suites"


class TaskError(ValueError):
    """A task or suite file is missing or invalid; the message names the file, the key and the fix."""


class TaskConfig(BaseModel):
    """One evaluation: a protocol on a dataset.

    Attributes:
        name: unique task name (the file stem for built-ins).
        version: bumped whenever scores would change.
        dataset: a dataset spec (``patches13``, ``imagefolder:/path``, ...).
        protocol: ``linear`` | ``knn`` | ``fewshot`` | ...
        params: protocol parameters (validated by the protocol itself).
        metrics: metric names to keep from the protocol's output (empty: keep all).
        primary: the headline metric used in leaderboards.
        seeds: seeds to run; each is its own cell.
        image_size: extraction input size override (None: the backbone card's).
        splits: which dataset splits the protocol reads; ``test`` always (without ``train``, protocols
            get the test split as train too, e.g. leave-one-out retrieval).
        ood: for OOD tasks, shifted test sets ``{name: dataset spec}`` whose ``test`` split is scored
            by the probe trained on ``dataset``; class names must be in-distribution class names.
        description: one line for listings.

    Dataset specs may name a path by placeholder, ``imagefolder:${cub200}/images``, resolved from a
    paths file (``bobench battle --paths paths.yaml``) when the task is loaded with ``paths``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    version: int = Field(ge=1)
    dataset: str
    protocol: str
    params: dict[str, Any] = Field(default_factory=dict)
    metrics: tuple[str, ...] = ()
    primary: str = "top1"
    seeds: tuple[int, ...] = (0,)
    image_size: int | None = Field(default=None, ge=8, le=1024)
    splits: tuple[str, ...] = ("train", "val", "test")
    ood: dict[str, str] = Field(default_factory=dict)
    description: str = ""

    def placeholders(self) -> list[str]:
        """Path placeholders (``${name}``) still unresolved in the dataset specs."""
        return sorted({m for spec in (self.dataset, *self.ood.values()) for m in _PLACEHOLDER.findall(spec)})

    @field_validator("protocol")
    @classmethod
    def _known_protocol(cls, v: str) -> str:
        from bobench.protocols import PROTOCOLS

        if v not in PROTOCOLS:
            raise ValueError(
                f"unknown protocol {v!r}; allowed: {sorted(PROTOCOLS)}.{suggest(v, list(PROTOCOLS))}"
            )
        return v

    @field_validator("splits")
    @classmethod
    def _known_splits(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        bad = [s for s in v if s not in {"train", "val", "test"}]
        if bad or "test" not in v or len(set(v)) != len(v):
            raise ValueError(f"splits must include test, from train/val/test, each once; got {list(v)}")
        return v

    def config_hash(self) -> str:
        """Hash of everything in the task that changes scores (version included, description not)."""
        d = self.model_dump(mode="json", exclude={"description"})
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


class SuiteConfig(BaseModel):
    """A named battle: backbones × tasks."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    backbones: tuple[str, ...] = Field(min_length=1)
    tasks: tuple[str, ...] = Field(min_length=1)
    description: str = ""


def _format_error(path: Path | str, exc: ValidationError, model: type[BaseModel]) -> str:
    allowed = sorted(model.model_fields)
    lines = [f"invalid {model.__name__.replace('Config', '').lower()} file {path}:"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(
                f"  key {key!r} is not allowed.{suggest(key, allowed)} Allowed keys: {', '.join(allowed)}"
            )
        elif err["type"] == "missing":
            lines.append(f"  key {key!r} is required")
        else:
            lines.append(f"  key {key!r}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


class _Loader(yaml.SafeLoader):
    """YAML 1.1's safe loader, except that ``1e-3`` is a float (YAML 1.2, and what anyone writing a
    learning rate means); PyYAML alone reads it as the string ``"1e-3"``."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9_]+|[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"
    ),
    list("-+0123456789."),
)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.load(path.read_text(), Loader=_Loader)  # a SafeLoader subclass: builds plain data only
    except FileNotFoundError:
        raise TaskError(f"file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise TaskError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise TaskError(f"{path} must hold a mapping of keys, got {type(data).__name__}")
    return data


def _resolve(name_or_path: str | Path, folder: Path, kind: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in {".yaml", ".yml"}:
        if not p.is_file():
            raise TaskError(f"{kind} file {p} does not exist")
        return p
    candidate = folder / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    names = [f.stem for f in folder.glob("*.yaml")]
    listing = "bobench tasks list" if kind == "task" else "bobench tasks suites"
    raise TaskError(
        f"unknown {kind} {str(name_or_path)!r}.{suggest(str(name_or_path), names)} "
        f"See `{listing}`, or pass a path to a {kind} YAML file."
    )


@cache
def _load_task_file(path: Path) -> TaskConfig:
    data = _read_yaml(path)
    data.setdefault("name", path.stem)
    try:
        return TaskConfig.model_validate(data)
    except ValidationError as exc:
        raise TaskError(_format_error(path, exc, TaskConfig)) from None


def load_paths(path: str | Path | None = None) -> dict[str, str]:
    """A paths file: a YAML mapping ``name: /where/the/dataset/is`` (``~`` expanded).

    ``path`` None reads ``$BOBENCH_PATHS`` if set, else returns ``{}``.
    """
    path = path or os.environ.get("BOBENCH_PATHS")
    if not path:
        return {}
    data = _read_yaml(Path(path))
    bad = [k for k, v in data.items() if not isinstance(v, str | int | float) or isinstance(v, bool)]
    if bad:
        raise TaskError(f"paths file {path}: {bad[0]!r} must map to a path string")
    return {str(k): os.path.expanduser(str(v)) for k, v in data.items()}


def resolve_paths(task: TaskConfig, paths: dict[str, str], where: str = "") -> TaskConfig:
    """``task`` with ``${name}`` placeholders replaced from ``paths``.

    Raises:
        TaskError: a placeholder has no entry (the message names each missing key and the fix).
    """
    missing = [k for k in task.placeholders() if k not in paths]
    if missing:
        raise TaskError(
            f"task {task.name} needs the path(s) {', '.join(missing)}{where}: add lines such as "
            f"'{missing[0]}: /data/{missing[0]}' to a paths file and pass it with --paths FILE "
            "(or set BOBENCH_PATHS)"
        )

    def sub(spec: str) -> str:
        return _PLACEHOLDER.sub(lambda m: paths[m.group(1)], spec)

    if not task.placeholders():
        return task
    return task.model_copy(
        update={"dataset": sub(task.dataset), "ood": {k: sub(v) for k, v in task.ood.items()}}
    )


def load_task(name_or_path: str | Path, paths: dict[str, str] | None = None) -> TaskConfig:
    """A built-in task by name (``patches13-linear``) or a task YAML file by path.

    With ``paths`` (see :func:`load_paths`), ``${name}`` placeholders in its dataset specs are resolved.
    """
    task = _load_task_file(_resolve(name_or_path, TASK_DIR, "task").resolve())
    return task if paths is None else resolve_paths(task, paths)


def load_suite(name_or_path: str | Path) -> SuiteConfig:
    """A built-in suite by name (``demo``) or a suite YAML file by path; its tasks are checked to exist."""
    path = _resolve(name_or_path, SUITE_DIR, "suite")
    data = _read_yaml(path)
    data.setdefault("name", path.stem)
    try:
        suite = SuiteConfig.model_validate(data)
    except ValidationError as exc:
        raise TaskError(_format_error(path, exc, SuiteConfig)) from None
    for t in suite.tasks:  # fail before any work starts, naming the suite file
        try:
            load_task(t if not t.endswith((".yaml", ".yml")) else path.parent / t)
        except TaskError as exc:
            raise TaskError(f"suite {path}: {exc}") from None
    return suite


def list_tasks() -> list[dict[str, Any]]:
    """Built-in tasks with name, version, dataset, protocol and description."""
    out = []
    for f in sorted(TASK_DIR.glob("*.yaml")):
        t = load_task(f)
        out.append(
            {
                "name": t.name,
                "version": t.version,
                "dataset": t.dataset,
                "protocol": t.protocol,
                "primary": t.primary,
                "description": t.description,
            }
        )
    return out


def list_suites() -> list[dict[str, Any]]:
    """Built-in suites with their sizes."""
    out = []
    for f in sorted(SUITE_DIR.glob("*.yaml")):
        s = load_suite(f)
        out.append(
            {
                "name": s.name,
                "backbones": len(s.backbones),
                "tasks": len(s.tasks),
                "description": s.description,
            }
        )
    return out
