"""Readers for the Google Landmarks v2 retrieval benchmark and INRIA Copydays, as published.

See :func:`read_gldv2` and :func:`read_copydays`; shared folder checks live in
:mod:`bobench.data.retrieval_readers` (which also reads revisitop's ROxford5k / RParis6k).
"""

from __future__ import annotations

import csv
import os
import re
from collections import Counter
from collections.abc import Sequence

from bobench.data.errors import DatasetError
from bobench.data.manifest import IMAGE_EXTENSIONS, FileItems
from bobench.data.retrieval_readers import file_items, require_files, split_root
from bobench.data.spec import DatasetSpec

# ---------------------------------------------------------------------------------------------- GLDv2
_GLDV2_ID = re.compile(r"[A-Za-z0-9_-]{3,}")  # published ids are 16 hex digits; anything path-safe works
_GLDV2_IDS = re.compile(r"(?:[A-Za-z0-9_-]{3,}\n)*")
_GLDV2_USAGE = {"private": ("private",), "public": ("public",), "all": ("public", "private")}
_GLDV2_SOLUTION = "retrieval_solution_v2.1.csv"


def _csv_columns(path: str, columns: Sequence[str]) -> list[list[str]]:
    """One list per name in ``columns``: its values in the non-blank data rows of ``path``.

    Built column by column with C-level helpers, so 760k rows take about a second (no pandas).
    """
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            rows = list(filter(None, reader))  # filter: drop blank lines
    except OSError as exc:
        raise DatasetError(
            f"cannot read {path} ({exc.strerror}); the GLDv2 retrieval layout has index.csv, test.csv "
            f"and {_GLDV2_SOLUTION} in the dataset folder."
        ) from exc
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(
            f"{path} is not a UTF-8 CSV file ({exc}); re-extract it from the release."
        ) from exc
    absent = [c for c in columns if c not in header]
    if absent:
        raise DatasetError(
            f"{path} has no {absent[0]!r} column (header: {', '.join(header) or 'empty'}); "
            f"expected columns {', '.join(columns)}."
        )
    if set(map(len, rows)) - {len(header)}:
        short = next(k for k, row in enumerate(rows) if len(row) != len(header))
        raise DatasetError(
            f"{path} data row {short + 1} has {len(rows[short])} fields, not {len(header)}; fix the row."
        )
    return [[row[i] for row in rows] for i in (header.index(c) for c in columns)]


def _gldv2_ids(path: str) -> list[str]:
    (ids,) = _csv_columns(path, ("id",))
    # One regex pass over all ids at once; the per-id search below runs only to name a bad one.
    if _GLDV2_IDS.fullmatch("\n".join([*ids, ""])) is None:
        k, bad = next((k, i) for k, i in enumerate(ids) if not _GLDV2_ID.fullmatch(i))
        raise DatasetError(
            f"{path} data row {k + 1}: {bad!r} is not a GLDv2 image id (such as 0123456789abcdef)."
        )
    if len(set(ids)) != len(ids):
        dup = next(i for i, n in Counter(ids).items() if n > 1)
        raise DatasetError(f"{path} lists image id {dup!r} twice; each id must appear once.")
    return ids


def _gldv2_paths(folder: str, ids: Sequence[str]) -> list[str]:
    return [f"{folder}/{i[0]}/{i[1]}/{i[2]}/{i}.jpg" for i in ids]


def read_gldv2(spec: DatasetSpec, split: str) -> FileItems:
    """The Google Landmarks Dataset v2 retrieval benchmark in its published layout (Weyand et al., CVPR 2020).

    Layout: ``<path>/index.csv`` and ``<path>/test.csv`` (column ``id``),
    ``<path>/retrieval_solution_v2.1.csv`` (columns ``id,images,Usage``: ``images`` is the
    space-separated index ids relevant to test image ``id``, or ``None``; ``Usage`` is ``Public``,
    ``Private`` or ``Ignored``), and images ``<path>/index/a/b/c/<id>.jpg`` and
    ``<path>/test/a/b/c/<id>.jpg`` (``a``, ``b``, ``c``: the id's first three characters).

    Option ``usage`` (``private`` (default), ``public`` or ``all`` = both) selects the query rows.

    Splits: ``"train"``: every index image, in ``index.csv`` order. ``"test"``: the test images, in
    ``test.csv`` order, whose ``Usage`` matches and that have at least one relevant index image;
    ``extras["retrieval_gt"]`` holds each query's relevant index positions as ``"easy"`` (``"hard"``
    and ``"junk"`` empty), so a task with ``settings: [easy]`` computes the benchmark's plain mAP. Every
    item has label 0 of classes ``["gldv2"]``.

    Raises:
        DatasetError: a missing CSV or column, a malformed or duplicated id, a solution row whose query
            is not in ``test.csv`` or whose relevant image is not in ``index.csv``, a missing image, no
            query for the chosen usage, a bad ``usage``, or split ``"val"``.
    """
    root = split_root(spec, split)
    usage = (spec.option("usage", "private") or "").lower()
    if usage not in _GLDV2_USAGE:
        raise DatasetError(
            f"gldv2 option usage={usage!r} is not one of {', '.join(_GLDV2_USAGE)}; e.g. 'gldv2:{root}?usage=all'."
        )
    index_csv = os.path.join(root, "index.csv")
    index_ids = _gldv2_ids(index_csv)
    if split == "train":
        paths = _gldv2_paths("index", index_ids)
        require_files(
            root, paths, f"the GLDv2 layout is {root}/index/a/b/c/<id>.jpg for every id in {index_csv}"
        )
        return file_items(root, paths, [0] * len(paths), ["gldv2"], extras={"protocol": "gldv2"})

    position = {image_id: i for i, image_id in enumerate(index_ids)}
    test_csv, solution = os.path.join(root, "test.csv"), os.path.join(root, _GLDV2_SOLUTION)
    test_order = _gldv2_ids(test_csv)
    test_ids = set(test_order)
    relevant: dict[str, list[int]] = {}
    seen: set[str] = set()
    for k, (query, images, use) in enumerate(
        zip(*_csv_columns(solution, ("id", "images", "Usage")), strict=True)
    ):
        where, use = f"{solution} data row {k + 1}", use.strip().lower()
        if query not in test_ids:
            raise DatasetError(
                f"{where}: query {query!r} is not in {test_csv}; both files must come from one release."
            )
        if query in seen:
            raise DatasetError(f"{where}: query {query!r} appears twice; each query has one row.")
        seen.add(query)
        if use not in ("public", "private", "ignored"):
            raise DatasetError(f"{where}: Usage {use!r} is not Public, Private or Ignored.")
        if use not in _GLDV2_USAGE[usage] or images.strip() in ("", "None"):
            continue
        hits: list[int] = []
        for image_id in images.split():
            if image_id not in position:
                raise DatasetError(
                    f"{where}: relevant image {image_id!r} of query {query!r} is not in {index_csv}."
                )
            hits.append(position[image_id])
        relevant[query] = sorted(set(hits))
    queries = [q for q in test_order if q in relevant]
    if not queries:
        raise DatasetError(f"{solution} has no {usage} query with a relevant index image; try usage=all.")
    paths = _gldv2_paths("test", queries)
    require_files(root, paths, f"the GLDv2 layout is {root}/test/a/b/c/<id>.jpg for every query id")
    gt = [{"easy": relevant[q], "hard": [], "junk": []} for q in queries]
    extras = {"protocol": "gldv2", "usage": usage, "retrieval_gt": gt}
    return file_items(root, paths, [0] * len(paths), ["gldv2"], extras=extras)


# ------------------------------------------------------------------------------------------- Copydays
_COPYDAYS_KINDS = ("strong", "jpegqual", "crops")


def _images_below(root: str, sub: str) -> list[str]:
    """Sorted POSIX paths (relative to ``root``) of the images anywhere below ``root/sub``."""
    found: list[str] = []
    for folder, dirs, files in os.walk(os.path.join(root, sub)):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = os.path.relpath(folder, root).replace(os.sep, "/")
        found += [
            f"{rel}/{f}" for f in files if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)
        ]
    return sorted(found)


def _block(path: str, root: str) -> str:
    stem = os.path.splitext(path.rpartition("/")[2])[0]
    if len(stem) < 4:
        raise DatasetError(
            f"copydays image {os.path.join(root, path)}: its name does not start with a 4-character block "
            "id (Copydays names look like 200000.jpg); rename or remove it."
        )
    return stem[:4]


def read_copydays(spec: DatasetSpec, split: str) -> FileItems:
    """INRIA Copydays in its published layout (Douze et al., CIVR 2009), for copy detection.

    Layout: ``<path>/original/`` (the 157 originals, named ``XXXXYY.jpg``), ``<path>/strong/`` (strong
    attacks), ``<path>/jpegqual/<quality>/`` and ``<path>/crops/<percent>/``. The block id of an image
    is the first 4 characters of its file name; a transformed image is relevant to the originals of its
    block. Unsure of the exact nesting of each archive, the reader is tolerant: every image anywhere
    below a kind's folder is read (dot-files skipped), in sorted path order. With one original per block
    (as published) block relevance equals the 1:1 original↔copy mapping used for jpegqual and crops.

    Option ``queries`` (``strong``, ``jpegqual``, ``crops`` or ``all`` (default)) picks the query kinds.

    Splits: ``"train"``: the originals (gallery). ``"test"``: the transformed images of the chosen
    kinds, in that kind order. Labels index the sorted block ids of the originals (the classes), so
    class-based retrieval (same block = relevant) applies; extras are ``{"protocol": "copydays"}``.

    Raises:
        DatasetError: no originals, a chosen kind folder missing or empty, a name too short for a block
            id, a query whose block has no original, a bad ``queries``, or split ``"val"``.
    """
    root = split_root(spec, split)
    queries = (spec.option("queries", "all") or "").lower()
    if queries not in (*_COPYDAYS_KINDS, "all"):
        raise DatasetError(
            f"copydays option queries={queries!r} is not one of {', '.join(_COPYDAYS_KINDS)}, all; "
            f"e.g. 'copydays:{root}?queries=strong'."
        )
    layout = "the Copydays layout is original/, strong/, jpegqual/<quality>/ and crops/<percent>/"
    originals = _images_below(root, "original")
    if not originals:
        raise DatasetError(
            f"copydays dataset {root} has no images in {os.path.join(root, 'original')}; {layout}."
        )
    classes = sorted({_block(p, root) for p in originals})
    index = {block: i for i, block in enumerate(classes)}
    extras = {"protocol": "copydays"}
    if split == "train":
        return file_items(
            root, originals, [index[_block(p, root)] for p in originals], classes, extras=extras
        )
    paths: list[str] = []
    for kind in _COPYDAYS_KINDS if queries == "all" else (queries,):
        found = _images_below(root, kind)
        if not found:
            raise DatasetError(
                f"copydays dataset {root} has no images in {os.path.join(root, kind)}; {layout}. Extract "
                f"that archive there, or choose other queries (e.g. ?queries=strong)."
            )
        paths += found
    labels: list[int] = []
    for p in paths:
        block = _block(p, root)
        if block not in index:
            raise DatasetError(
                f"copydays query {os.path.join(root, p)} has block id {block!r}, which no image in "
                f"{os.path.join(root, 'original')} has; restore that original or remove the query."
            )
        labels.append(index[block])
    return file_items(root, paths, labels, classes, extras=extras)
