"""The battle preflight: before any work, which backbones lack weights and which datasets are missing.

A battle over datasets and weights that are not on this machine should say so in a few lines, with
the one command or the one key that fixes each, instead of failing every cell at run time. The
preflight never builds a model, reads an image or downloads: it asks the weights caches
(:func:`bobench.backbones.availability.missing_weights`) and ``stat()``s dataset paths. The runner
records every cell it blocks as failed with the cause (so the store and the report list them) and runs
the rest; ``bobench battle --strict`` stops instead, ``--dry-run`` only prints.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from bobench.task import TaskConfig


@dataclass(frozen=True)
class Blocker:
    """One thing that keeps cells from running.

    Attributes:
        kind: ``"weights"`` (of a backbone) or ``"dataset"`` (of a task).
        subject: the backbone name or the dataset spec.
        reason: what is missing, for the store and the report.
        fix: the one command or key that fixes it.
    """

    kind: str
    subject: str
    reason: str
    fix: str
    #: for a dataset path that came from a paths file: the key that set it
    key: str | None = None

    def message(self) -> str:
        """One line: subject, reason and fix (stored as the error of every cell it blocks)."""
        what = "weights of backbone" if self.kind == "weights" else "dataset"
        return f"preflight: {what} {self.subject} unavailable: {self.reason}. Fix: {self.fix}"


@dataclass
class Preflight:
    """What the preflight found, by backbone and by dataset spec."""

    weights: dict[str, Blocker] = field(default_factory=dict)
    datasets: dict[str, Blocker] = field(default_factory=dict)
    #: the one command that fetches every missing backbone's weights
    fetch_command: str = ""
    #: the paths file the dataset paths came from, if any (named in the fix)
    paths_file: str | None = None

    @property
    def ok(self) -> bool:
        """True when nothing is missing."""
        return not self.weights and not self.datasets

    def blocker(self, backbone: str, task: TaskConfig) -> Blocker | None:
        """Why the cell (``backbone``, ``task``) cannot run here, or None."""
        if backbone in self.weights:
            return self.weights[backbone]
        for spec in (task.dataset, *task.ood.values()):
            if spec in self.datasets:
                return self.datasets[spec]
        return None

    def lines(self, limit: int = 6) -> list[str]:
        """A few lines for the terminal, one per kind of cause, each with its fix; names beyond
        ``limit`` are counted, not listed."""

        def listed(items: list[str]) -> str:
            more = f" and {len(items) - limit} more" if len(items) > limit else ""
            return ", ".join(items[:limit]) + more

        out: list[str] = []
        if self.weights:
            names = sorted(self.weights)
            out.append(f"{len(names)} backbone(s) lack weights on this machine: {listed(names)}.")
            out.append(f"  fetch them where the network exists: {self.fetch_command}")
            out.append(f"  e.g. {names[0]}: {self.weights[names[0]].reason}")
        keyed: dict[str, str] = {}
        for b in self.datasets.values():
            if b.key is not None:
                keyed.setdefault(b.key, b.reason.split(" does not exist")[0])
            else:
                out.append(f"dataset {b.subject}: {b.reason}; {b.fix}.")
        if keyed:
            where = self.paths_file or "your paths file (--paths FILE)"
            items = [f"{k} ({v})" for k, v in sorted(keyed.items())]
            out.append(f"{len(items)} dataset path(s) do not exist: {listed(items)}.")
            out.append(f"  set those keys in {where} to where each dataset is (see examples/bob-paths.yaml).")
        return out


def dataset_path(spec: str) -> str | None:
    """The file or folder a dataset spec reads from (None for embedded data).

    Raises:
        DatasetError: the spec itself is malformed (a usage error, reported before any work).
    """
    from bobench.data import dense_readers, seg_files
    from bobench.data.dense_embedded import DENSE_CATALOG
    from bobench.data.errors import DatasetError
    from bobench.data.seg_files import SEG_CATALOG
    from bobench.data.spec import DatasetSpec

    try:
        return DatasetSpec.parse(spec).path
    except DatasetError:
        # a detection (coco:/..., sim10k:/...) or segmentation (ade20k:/..., voc:/...) spec, which the
        # classification parser does not know; each reader parses (and checks the options of) its own
        scheme = spec.strip().partition("?")[0].partition(":")[0] if ":" in spec else ""
        reader = seg_files if scheme in seg_files.SCHEMES else dense_readers
        scheme, path, _ = reader.split_spec(spec)
        if scheme in reader.SCHEMES and path:
            return path
        if scheme in ("", "embedded") and (path in DENSE_CATALOG or path in SEG_CATALOG):
            return None
        raise


def check(
    backbones: Sequence[str],
    tasks: Sequence[TaskConfig],
    *,
    paths: Mapping[str, str] | None = None,
    paths_file: str | None = None,
    fetch_hint: str | None = None,
) -> Preflight:
    """Check weights and dataset paths of a battle; builds nothing, downloads nothing.

    Args:
        backbones: the battle's backbones (names already validated).
        tasks: its tasks with path placeholders resolved.
        paths: the paths file's mapping, to name the key that points at a missing path.
        paths_file: where that mapping came from, to name it in the fix.
        fetch_hint: the fetch command to suggest (default: ``bobench backbones fetch NAME ...``).
    """
    from bobench.backbones.availability import missing_weights

    found = Preflight(paths_file=paths_file)
    for name in dict.fromkeys(backbones):
        reason = missing_weights(name)
        if reason is not None:
            fix = f"bobench backbones fetch {name}"
            found.weights[name] = Blocker("weights", name, reason, fix)
    if found.weights:
        found.fetch_command = fetch_hint or "bobench backbones fetch " + " ".join(found.weights)
    for task in tasks:
        for spec in (task.dataset, *task.ood.values()):
            if spec in found.datasets:
                continue
            path = dataset_path(spec)
            if path is None or os.path.exists(path):
                continue
            key = _key_for(path, paths or {})
            fix = (
                f"set `{key}:` in {paths_file or 'your paths file (--paths FILE)'} to where the dataset is"
                if key
                else "fix the path in the task's dataset spec"
            )
            found.datasets[spec] = Blocker("dataset", spec, f"{path} does not exist", fix, key)
    return found


def _key_for(path: str, paths: Mapping[str, str]) -> str | None:
    """The paths-file key whose value the missing ``path`` starts with (the longest such value)."""
    hits = [(len(v), k) for k, v in paths.items() if path == v or path.startswith(v.rstrip("/") + "/")]
    return max(hits)[1] if hits else None
