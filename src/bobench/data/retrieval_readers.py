"""Readers for the published layouts of image-retrieval benchmarks: revisitop, GLDv2 and Copydays.

Each is ``read(spec, split) -> FileItems`` (see :mod:`bobench.data.readers`) and follows the retrieval
convention of ``bobench.protocols.retrieval``: split ``"train"`` is the gallery (database), ``"test"``
the queries, and there is no ``"val"`` split. Both splits of a dataset share one class list, so the
runner's class count is the same for both. Ground truth that is not a class label travels in the test
split's ``FileItems.extras["retrieval_gt"]``: one ``{"easy": [...], "hard": [...], "junk": [...]}``
per query, in test-split order, holding positions in the train split's item order.

Gallery extras never depend on query options (``usage``, ``queries``), so changing those leaves the
gallery's manifest hash, and any features cached under it, valid. Every image a layout names is checked
to exist (one directory listing per folder rather than a ``stat()`` per file), so a missing file is
reported with the layout that was expected.
"""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Sequence
from typing import Any

import numpy as np

from bobench.data.errors import DatasetError
from bobench.data.manifest import FileItems
from bobench.data.spec import DatasetSpec
from bobench.registry import suggest

_GT_KEYS = ("easy", "hard", "junk")


# --------------------------------------------------------------------------------------------- shared
def split_root(spec: DatasetSpec, split: str) -> str:
    """``spec.path`` after checking it is a folder and ``split`` is ``"train"`` (gallery) or ``"test"``.

    Raises:
        DatasetError: the folder is missing or the split is neither, saying which are allowed.
    """
    root = os.fspath(spec.path or "")
    if not os.path.isdir(root):
        raise DatasetError(
            f"{spec.kind} dataset folder {root} does not exist or is not a folder; check the path."
        )
    if split not in ("train", "test"):
        raise DatasetError(
            f"{spec.kind} has no {split!r} split: 'train' is the gallery (database) and 'test' the queries "
            f"of {root}; ask for one of those."
        )
    return root


def _listing(folder: str) -> set[str]:
    try:
        with os.scandir(folder) as entries:
            return {e.name for e in entries}
    except OSError:
        return set()


def require_files(root: str, paths: Sequence[str], layout: str) -> None:
    """Raise a :class:`DatasetError` naming the first of ``paths`` (relative to ``root``) that is missing."""
    listings: dict[str, set[str]] = {}
    missing: list[str] = []
    for rel in paths:
        folder, _, name = rel.rpartition("/")
        if folder not in listings:
            listings[folder] = _listing(os.path.join(root, folder))
        names = listings[folder]
        # isfile() for names absent from a listed folder: case-insensitive file systems
        if name not in names and not (names and os.path.isfile(os.path.join(root, rel))):
            missing.append(rel)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DatasetError(
            f"image {os.path.join(root, missing[0])} is missing{more}; {layout}. Restore the files "
            "(re-extract the release) or point the spec at the right folder."
        )


def file_items(
    root: str, paths: list[str], labels: Sequence[int], classes: list[str], **kw: Any
) -> FileItems:
    """The :class:`FileItems` of a retrieval split (no seeded split); ``kw`` goes to ``FileItems``."""
    return FileItems(root, paths, np.asarray(labels, dtype=np.int64), classes, split_params=None, **kw)


# ------------------------------------------------------------------------------------------ revisitop
class _GndUnpickler(pickle.Unpickler):
    """Unpickles a gnd file without running code: every global is refused, so only builtin data loads.

    The official files hold only dicts, lists, strings and numbers, which pickle builds without looking
    up any global. numpy arrays (in copies re-saved by other tools) are refused too: numpy's rebuilding
    globals accept a dtype whose state was edited to hide object fields, which turns raw bytes into
    object pointers (memory corruption), so they are not safe to allow.
    """

    def __init__(self, file: Any, path: str) -> None:
        super().__init__(file, encoding="utf-8")  # utf-8: image names in pickles written by Python 2
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        hint = (
            "; this copy holds numpy data: if you trust it, re-save it with its arrays turned into lists"
            if module.split(".")[0] == "numpy"
            else ""
        )
        raise DatasetError(
            f"{self._path} refers to the global '{module}.{name}', which bobench refuses to load: gnd "
            "pickles are read without running code and may hold only dicts, lists, strings and numbers"
            f"{hint}. The official revisitop gnd files qualify; re-download yours."
        )


def _plain(obj: Any) -> Any:
    """``obj`` with tuples turned into lists, so validation and JSON hashing see one sequence type."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _load_gnd(path: str) -> Any:
    try:
        with open(path, "rb") as f:
            return _plain(_GndUnpickler(f, path).load())
    except DatasetError:
        raise
    except OSError as exc:
        raise DatasetError(f"cannot read {path} ({exc.strerror}); check that it is readable.") from exc
    except Exception as exc:  # a truncated or foreign file fails in many ways inside pickle
        raise DatasetError(
            f"{path} is not a readable revisitop gnd pickle ({type(exc).__name__}: {exc}); re-download it."
        ) from exc


def _names(value: Any, key: str, path: str) -> list[str]:
    if not isinstance(value, list):
        raise DatasetError(f"{path}: '{key}' must be a list of image names, not {type(value).__name__}.")
    for i, name in enumerate(value):
        # A name becomes jpg/<name>.jpg under the root: refuse anything that could leave it.
        if not isinstance(name, str) or not name or name.startswith(("/", "\\")) or ".." in name.split("/"):
            raise DatasetError(
                f"{path}: {key}[{i}] = {name!r} is not an image name such as 'all_souls_000013'."
            )
    return value


def _gnd_entry(
    entry: Any, i: int, qname: str, n_db: int, path: str
) -> tuple[list[float], dict[str, list[int]]]:
    where = f"{path}: gnd[{i}] (query {qname!r})"
    if not isinstance(entry, dict):
        raise DatasetError(
            f"{where} must be a dict with keys bbx, easy, hard, junk, not {type(entry).__name__}."
        )
    missing = [k for k in ("bbx", *_GT_KEYS) if k not in entry]
    if missing:
        raise DatasetError(f"{where} lacks key {missing[0]!r}; a gnd entry has bbx, easy, hard and junk.")
    bbx = entry["bbx"]
    if (
        not isinstance(bbx, list)
        or len(bbx) != 4
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbx)
        or not (bbx[0] < bbx[2] and bbx[1] < bbx[3])
    ):
        raise DatasetError(f"{where}: bbx {bbx!r} is not a box [x0, y0, x1, y1] with x0 < x1 and y0 < y1.")
    gt: dict[str, list[int]] = {}
    for key in _GT_KEYS:
        ids = entry[key]
        if not isinstance(ids, list) or not all(isinstance(j, int) and not isinstance(j, bool) for j in ids):
            raise DatasetError(f"{where}: '{key}' must be a list of integer database indices, got {ids!r}.")
        bad = [j for j in ids if not 0 <= j < n_db]
        if bad:
            raise DatasetError(
                f"{where}: '{key}' index {bad[0]} is out of range for the {n_db} database images of imlist; "
                "the file is corrupt or from another dataset."
            )
        gt[key] = ids
    return [float(v) for v in bbx], gt


def _revisitop_name(spec: DatasetSpec, root: str) -> str:
    found = sorted(f[4:-4] for f in _listing(root) if f.startswith("gnd_") and f.endswith(".pkl"))
    name = spec.option("name")
    if name is not None:
        if name not in found:
            raise DatasetError(
                f"revisitop dataset {root}: name={name!r} needs {os.path.join(root, f'gnd_{name}.pkl')}, "
                f"which does not exist.{suggest(name, found)} Found ground-truth files for: "
                f"{', '.join(found) or 'none'}."
            )
        return name
    if not found:
        raise DatasetError(
            f"revisitop dataset {root} has no gnd_*.pkl file; expected the revisitop release layout "
            f"{root}/gnd_roxford5k.pkl (or gnd_rparis6k.pkl) beside {root}/jpg/<name>.jpg."
        )
    if len(found) > 1:
        raise DatasetError(
            f"revisitop dataset {root} holds several ground-truth files ({', '.join(f'gnd_{n}.pkl' for n in found)}); "
            f"choose one with the name option, e.g. 'revisitop:{root}?name={found[0]}'."
        )
    return found[0]


def read_revisitop(spec: DatasetSpec, split: str) -> FileItems:
    """ROxford5k / RParis6k in the revisitop release layout (Radenović et al., CVPR 2018).

    Layout: ``<path>/gnd_<name>.pkl`` and ``<path>/jpg/<image>.jpg``. The gnd pickle is a dict with
    ``imlist`` (database image names, no extension), ``qimlist`` (query image names) and ``gnd`` (one
    dict per query: ``bbx`` ``[x0, y0, x1, y1]`` and ``easy``/``hard``/``junk`` lists of ``imlist``
    indices). It is unpickled without running code (see :class:`_GndUnpickler`).

    Option ``name`` (``roxford5k``, ``rparis6k``, or any ``<name>`` with a ``gnd_<name>.pkl``) picks the
    gnd file; by default the folder's single ``gnd_*.pkl`` is used.

    Splits: ``"train"``: the database images, in ``imlist`` order. ``"test"``: the query images, in
    ``qimlist`` order, cropped on load to their ``bbx`` (the revisitop protocol), with
    ``extras["retrieval_gt"]`` the ``easy``/``hard``/``junk`` database indices of each query. Every
    item has label 0 of classes ``["revisitop"]``; extras also hold ``protocol`` and ``dataset`` (name).

    Raises:
        DatasetError: a missing, ambiguous, unreadable or malformed gnd file (naming the key or index), a
            refused pickle global, a missing image, or split ``"val"``.
    """
    root = split_root(spec, split)
    name = _revisitop_name(spec, root)
    path = os.path.join(root, f"gnd_{name}.pkl")
    data = _load_gnd(path)
    missing = [k for k in ("imlist", "qimlist", "gnd") if not isinstance(data, dict) or k not in data]
    if missing:
        raise DatasetError(
            f"{path} has no {missing[0]!r}; a revisitop gnd file is a dict of imlist, qimlist, gnd."
        )
    imlist, qimlist = _names(data["imlist"], "imlist", path), _names(data["qimlist"], "qimlist", path)
    gnd = data["gnd"]
    if not isinstance(gnd, list) or len(gnd) != len(qimlist):
        count = f"{len(gnd)} entries" if isinstance(gnd, list) else f"a {type(gnd).__name__}"
        raise DatasetError(
            f"{path}: 'gnd' has {count} but qimlist names {len(qimlist)} queries; they must match."
        )
    entries = [_gnd_entry(g, i, qimlist[i], len(imlist), path) for i, g in enumerate(gnd)]
    names = imlist if split == "train" else qimlist
    paths = [f"jpg/{n}.jpg" for n in names]
    require_files(root, paths, f"the revisitop layout is {root}/jpg/<name>.jpg for every name in {path}")
    extras: dict[str, Any] = {"protocol": "revisitop", "dataset": name}
    if split == "train":
        return file_items(root, paths, [0] * len(paths), ["revisitop"], extras=extras)
    extras["retrieval_gt"] = [gt for _, gt in entries]
    boxes = np.array([bbx for bbx, _ in entries], dtype=np.float64).reshape(-1, 4)
    return file_items(root, paths, [0] * len(paths), ["revisitop"], boxes=boxes, extras=extras)
