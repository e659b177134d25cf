"""CheXpert (Irvin et al. 2019) as Battle of the Backbones reads it: 5 chest X-ray findings, multi-label.

Layout (``CheXpert-v1.0-small.zip`` as released; the full-resolution ``CheXpert-v1.0`` is the same)::

    <path>/train.csv  <path>/valid.csv  <path>/train/patient00001/study1/view1_frontal.jpg  ...

Both CSVs have the header ``Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,...,Support Devices``; only
``Path``, ``Frontal/Lateral`` and the five :data:`LABELS` columns are read (the others are ignored).
``Path`` is relative to the dataset folder's PARENT (``CheXpert-v1.0-small/train/patient00001/...``):
its first folder is taken as the dataset folder, so a renamed ``<path>`` works too. Paths relative to
``<path>`` itself (``train/patient00001/...``) are accepted as well: each row uses whichever of the two
files exists. Item paths are kept relative to ``<path>``.

BoB's policy (``medical_chexpert/``, after Irvin et al.'s best per-finding choice):

* frontal views only (``Frontal/Lateral == Frontal``); option ``views=all`` keeps lateral ones too;
* the 5 competition findings, in the order of :data:`LABELS`, as a ``[N, 5]`` 0/1 target matrix;
* uncertain (``-1.0``) becomes 1 for Atelectasis and Edema (U-ones) and 0 for the other three
  (U-zeros), see :data:`UNCERTAIN_AS`; missing (empty: not mentioned in the report) becomes 0.

Splits: ``test`` is ``valid.csv`` (as BoB, which reports on the official validation set); ``train``
and ``val`` split ``train.csv`` by patient: ``spec.val_fraction`` of the patients (seeded by
``spec.seed``) with all their studies go to val, so no patient is in both. ``spec.test_fraction`` is
not used (the test set is fixed). ``val_fraction=0`` makes no val split (probes then use k-fold).

Example:
    >>> ds = load_dataset("chexpert:/data/CheXpert-v1.0-small", split="test")  # doctest: +SKIP
    >>> ds.multilabel, ds.classes[0], ds.targets.shape, ds[0][1].shape
    (True, 'Atelectasis', (202, 5), torch.Size([5]))
"""

from __future__ import annotations

import csv
import os

import numpy as np

from bobench.data.errors import DatasetError
from bobench.data.manifest import FileItems
from bobench.data.spec import DatasetSpec
from bobench.registry import suggest

LABELS: tuple[str, ...] = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
"""The 5 CheXpert competition findings, in target-column order."""

UNCERTAIN_AS: dict[str, int] = {
    "Atelectasis": 1,
    "Cardiomegaly": 0,
    "Consolidation": 0,
    "Edema": 1,
    "Pleural Effusion": 0,
}
"""What an uncertain (``-1.0``) label becomes, per finding: U-ones (1) or U-zeros (0), as BoB."""

VIEWS: tuple[str, ...] = ("frontal", "all")
MISSING = -2  # the raw code of an empty label cell (finding not mentioned): becomes 0
_VIEW_COLUMN = "Frontal/Lateral"
_VALUES = {1.0: 1, 0.0: 0, -1.0: -1}
_CSV = {"train": "train.csv", "val": "train.csv", "test": "valid.csv"}
_HEADER = "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,...,Pleural Effusion,...,Support Devices"


def apply_policy(raw: np.ndarray) -> np.ndarray:
    """BoB's targets from raw label codes.

    Args:
        raw: ``[N, 5]`` codes in :data:`LABELS` order: 1, 0, -1 (uncertain) or :data:`MISSING`.

    Returns:
        ``[N, 5]`` int64 0/1 targets: uncertain as :data:`UNCERTAIN_AS`, missing as 0.
    """
    raw = np.asarray(raw)
    u_value = np.array([UNCERTAIN_AS[name] for name in LABELS], dtype=np.int64)
    out = (raw == 1).astype(np.int64)
    return np.where(raw == -1, u_value[None, :], out)


class _Rows:
    """The rows of one CSV the split keeps: parallel lists."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.lines: list[int] = []
        self.frontal: list[bool] = []
        self.raw: list[list[int]] = []


def _label_code(text: str, where: str, column: str) -> int:
    value = text.strip()
    if not value:
        return MISSING
    try:
        code = _VALUES.get(float(value))
    except ValueError:
        code = None
    if code is None:
        raise DatasetError(
            f"{where}: {column} is {text!r}, not 1.0 (positive), 0.0 (negative), -1.0 (uncertain) or empty "
            "(not mentioned); fix the value, or restore the file from the CheXpert release."
        )
    return code


def _read_rows(csv_path: str) -> _Rows:
    rows = _Rows()
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        missing = [c for c in ("Path", _VIEW_COLUMN, *LABELS) if c not in header]
        if missing:
            raise DatasetError(
                f"CheXpert CSV {csv_path} line 1: header lacks column(s) {', '.join(missing)} (found: "
                f"{', '.join(header) or 'nothing'}); the released header is '{_HEADER}': restore the file "
                "from the CheXpert release."
            )
        col_path, col_view = header.index("Path"), header.index(_VIEW_COLUMN)
        cols = [header.index(name) for name in LABELS]
        for row in reader:
            where = f"CheXpert CSV {csv_path} line {reader.line_num}"
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise DatasetError(
                    f"{where}: {len(row)} fields but the header has {len(header)}; fix the row."
                )
            view = row[col_view].strip()
            if view not in ("Frontal", "Lateral"):
                raise DatasetError(
                    f"{where}: {_VIEW_COLUMN} is {view!r}, not Frontal or Lateral; fix the value."
                )
            path = row[col_path].strip().replace("\\", "/")
            if not path or path.startswith("/") or ".." in path.split("/"):
                raise DatasetError(
                    f"{where}: Path {path!r} must be a relative path inside the dataset, e.g. "
                    "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg; fix the value."
                )
            rows.raw.append([_label_code(row[c], where, name) for c, name in zip(cols, LABELS, strict=True)])
            rows.paths.append(path)
            rows.lines.append(reader.line_num)
            rows.frontal.append(view == "Frontal")
    if not rows.paths:
        raise DatasetError(
            f"CheXpert CSV {csv_path} has no rows; restore the file from the CheXpert release."
        )
    return rows


def patient_id(path: str) -> str | None:
    """The ``patientNNNNN`` folder of a CheXpert ``Path``, or ``None``."""
    return next((part for part in path.split("/") if part.startswith("patient")), None)


def patient_val_set(patients: list[str], val_fraction: float, seed: int) -> set[str]:
    """The patients sent to val: ``round(n * val_fraction)`` of the sorted unique ids (at most n - 1, so
    train keeps one), drawn by a generator seeded with ``seed``; independent of row order."""
    unique = sorted(set(patients))
    n_val = min(int(np.floor(len(unique) * val_fraction + 0.5)), len(unique) - 1)
    order = np.random.default_rng([seed, 0xC4E7]).permutation(len(unique))
    return {unique[i] for i in order[: max(n_val, 0)]}


def _resolve(root: str, path: str, where: str) -> str:
    """``path`` relative to ``root``: read relative to the root's parent (its first folder standing for
    the root) if that file exists, else relative to the root."""
    head, sep, rest = path.partition("/")
    candidates = ([rest] if sep and rest else []) + [path]
    for rel in candidates:
        if os.path.isfile(os.path.join(root, rel)):
            return rel
    tried = []
    if sep and rest:
        tried.append(
            f"{os.path.join(root, rest)} (Path relative to the dataset folder's parent, its first folder "
            f"{head!r} being the dataset folder)"
        )
    tried.append(f"{os.path.join(root, path)} (Path relative to the dataset folder)")
    raise DatasetError(
        f"{where}: image {path!r} is missing: {'neither ' if len(tried) > 1 else ''}{' nor '.join(tried)} "
        "exists; point the spec at the "
        "folder that holds train.csv, valid.csv, train/ and valid/, or extract the images again."
    )


def read_chexpert(spec: DatasetSpec, split: str) -> FileItems:
    """List one split of CheXpert (see the module docstring for the layout, policy and splits).

    Returns:
        :class:`FileItems` with ``targets`` ``[N, 5]`` int64 0/1, ``classes`` :data:`LABELS`, paths
        relative to ``spec.path`` and the CSV line of every item.

    Raises:
        DatasetError: a missing folder or CSV, a missing header column, a label that is not 1.0, 0.0,
            -1.0 or empty, a bad view or path, a missing image (naming both paths tried), an unknown
            ``views`` option, declared classes other than :data:`LABELS`, or a split that does not exist;
            each naming the CSV and line where there is one.
    """
    root = os.path.abspath(os.fspath(spec.path or ""))
    views = spec.option("views", "frontal")
    if views not in VIEWS:
        raise DatasetError(
            f"chexpert views={views!r} is unknown{suggest(str(views), list(VIEWS))}; use frontal or all."
        )
    if spec.classes is not None and tuple(spec.classes) != LABELS:
        raise DatasetError(f"chexpert dataset {root} has fixed labels ({', '.join(LABELS)}); drop 'classes'.")
    if not os.path.isdir(root):
        raise DatasetError(
            f"CheXpert folder {root} does not exist or is not a folder; expected the extracted "
            "CheXpert-v1.0-small/ holding train.csv, valid.csv, train/ and valid/."
        )
    csv_path = os.path.join(root, _CSV[split])
    if not os.path.isfile(csv_path):
        raise DatasetError(
            f"CheXpert CSV {csv_path} does not exist; expected {root}/train.csv and {root}/valid.csv as the "
            "CheXpert release extracts."
        )
    if split == "val" and spec.val_fraction == 0:
        raise DatasetError(
            f"CheXpert {root} has no 'val' split with val_fraction=0; set val_fraction > 0 (e.g. 0.1) to "
            "carve one from train.csv by patient."
        )
    rows = _read_rows(csv_path)
    keep = np.ones(len(rows.paths), dtype=bool) if views == "all" else np.array(rows.frontal)
    params = None
    if split != "test":
        patients = [patient_id(p) for p in rows.paths]
        bad = next((i for i, p in enumerate(patients) if p is None), None)
        if bad is not None:
            raise DatasetError(
                f"CheXpert CSV {csv_path} line {rows.lines[bad]}: Path {rows.paths[bad]!r} names no "
                "patientNNNNN folder, which the patient-wise train/val split needs; fix the value."
            )
        # Patients are drawn from every row (lateral views too), so `views` never moves a patient.
        val = patient_val_set(patients, spec.val_fraction, spec.seed)  # type: ignore[arg-type]
        keep &= np.array([(p in val) == (split == "val") for p in patients])
        params = {"split_by": "patient", "val_fraction": spec.val_fraction, "seed": spec.seed}
    index = np.flatnonzero(keep)
    lines = np.array(rows.lines, dtype=np.int64)[index]
    paths = [
        _resolve(root, rows.paths[i], f"CheXpert CSV {csv_path} line {line}")
        for i, line in zip(index, lines, strict=True)
    ]
    raw = np.array(rows.raw, dtype=np.int64).reshape(-1, len(LABELS))[index]
    return FileItems(
        root=root,
        paths=paths,
        targets=apply_policy(raw),
        classes=list(LABELS),
        split_params=params,
        manifest=csv_path,
        lines=lines,
    )
