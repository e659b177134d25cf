"""CSV manifest reader: a header naming ``path,label`` and optionally ``split``, one image per row.

Paths are relative to the CSV file's folder, or absolute. The class list is, in order of precedence,
``spec.classes``, a ``classes.txt`` beside the CSV (one name per line, in label-index order), or the
sorted unique labels. Extra columns are ignored.
"""

from __future__ import annotations

import csv
import os

import numpy as np

from bobench.data.errors import DatasetError
from bobench.data.manifest import FileItems
from bobench.data.spec import DatasetSpec
from bobench.data.splits import SPLITS, seeded_split_names, split_params, stratified_split
from bobench.registry import suggest


def _declared_classes(spec: DatasetSpec, csv_path: str) -> tuple[list[str] | None, str]:
    """The declared class list and where it came from (for messages), or ``(None, "")``."""
    if spec.classes is not None:
        return list(spec.classes), "the spec's 'classes'"
    txt = os.path.join(os.path.dirname(csv_path), "classes.txt")
    if not os.path.isfile(txt):
        return None, ""
    with open(txt, encoding="utf-8-sig") as f:
        names = [line.strip() for line in f if line.strip()]
    if not names or len(set(names)) != len(names):
        raise DatasetError(f"{txt} must list each class name once, one per line; fix or delete it.")
    return names, txt


class _Rows:
    """The parsed rows of a manifest: parallel lists, ``codes`` empty when there is no split column."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.labels: list[str] = []
        self.lines: list[int] = []
        self.codes: list[int] = []
        self.has_split = False


def _read_rows(csv_path: str, declared: list[str] | None, declared_from: str) -> _Rows:
    rows = _Rows()
    known = set(declared) if declared is not None else None
    with open(csv_path, newline="", encoding="utf-8-sig") as f:  # -sig: tolerate Excel's byte-order mark
        reader = csv.reader(f)
        header = [h.strip().lower() for h in next(reader, [])]
        missing = [c for c in ("path", "label") if c not in header]
        if missing:
            raise DatasetError(
                f"CSV manifest {csv_path} line 1: header lacks column(s) {', '.join(missing)} (found: "
                f"{', '.join(header) or 'nothing'}); make the first line 'path,label' or 'path,label,split'."
            )
        col_path, col_label = header.index("path"), header.index("label")
        col_split = header.index("split") if "split" in header else None
        rows.has_split = col_split is not None
        for row in reader:
            where = f"CSV manifest {csv_path} line {reader.line_num}"
            if not any(cell.strip() for cell in row):
                continue
            if len(row) < len(header):
                raise DatasetError(
                    f"{where}: {len(row)} fields but the header has {len(header)}; fix the row."
                )
            path, label = row[col_path].strip(), row[col_label].strip()
            if not path or not label:
                empty = "path" if not path else "label"
                raise DatasetError(f"{where}: empty {empty}; fill it in or drop the row.")
            if known is not None and label not in known:
                raise DatasetError(
                    f"{where}: label {label!r} is not in the class list from {declared_from}."
                    f"{suggest(label, declared or [])} Fix the label or add the class there."
                )
            if col_split is not None:
                value = row[col_split].strip().lower()
                if value not in SPLITS:
                    raise DatasetError(
                        f"{where}: split {row[col_split]!r} is not one of {', '.join(SPLITS)}; fix the value."
                    )
                rows.codes.append(SPLITS.index(value))
            rows.paths.append(path)
            rows.labels.append(label)
            rows.lines.append(reader.line_num)
    return rows


def read_csv_manifest(spec: DatasetSpec, split: str) -> FileItems:
    """List the items of ``split`` from the CSV manifest ``spec.path`` (files are not touched here).

    Without a ``split`` column, the splits are made by a seeded stratified split over all rows (see
    :func:`bobench.data.splits.stratified_split`), independent of row order; items keep their row order.

    Raises:
        DatasetError: naming the CSV file (and line number) for a missing or unparsable file, missing
            header columns, an empty cell, an unknown split value, a label outside the declared classes,
            no rows, or a split that does not exist.
    """
    csv_path = os.fspath(spec.path or "")
    if not os.path.isfile(csv_path):
        raise DatasetError(f"CSV manifest {csv_path} does not exist; check the path.")
    declared, declared_from = _declared_classes(spec, csv_path)
    try:
        rows = _read_rows(csv_path, declared, declared_from)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(
            f"CSV manifest {csv_path} cannot be parsed ({exc}); save it as UTF-8 CSV."
        ) from exc
    if not rows.paths:
        raise DatasetError(f"CSV manifest {csv_path} has no rows; add one line per image below the header.")
    classes = declared if declared is not None else sorted(set(rows.labels))
    index = {name: i for i, name in enumerate(classes)}
    targets = np.array([index[label] for label in rows.labels], dtype=np.int64)
    params = None
    if rows.has_split:
        codes = np.array(rows.codes, dtype=np.uint8)
        available = [s for i, s in enumerate(SPLITS) if np.any(codes == i)]
    else:
        available = seeded_split_names(spec.val_fraction, spec.test_fraction)
        params = split_params(spec.val_fraction, spec.test_fraction, spec.seed)
        codes = stratified_split(targets, classes, **params, keys=rows.paths)
    if split not in available:
        raise DatasetError(
            f"CSV manifest {csv_path} has no {split!r} split; available splits: {', '.join(available)}."
        )
    keep = np.flatnonzero(codes == SPLITS.index(split))
    return FileItems(
        root=os.path.dirname(os.path.abspath(csv_path)),
        paths=[rows.paths[i] for i in keep],
        targets=targets[keep],
        classes=classes,
        split_params=params,
        manifest=csv_path,
        lines=np.array(rows.lines, dtype=np.int64)[keep],
    )
