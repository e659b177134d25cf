"""Blockwise cosine top-k search over a streamed gallery: the neighbour search of kNN
(:mod:`bobench.protocols.knn`) and retrieval (:mod:`bobench.protocols.retrieval`).

Rows are L2-normalised (:func:`unit_rows`), so a dot product is the cosine similarity. The gallery is
read once, in pieces of a fixed number of rows cut from or joined across its shards
(:func:`gallery_pieces`; a memory map is read one piece at a time); for each piece and each block of
queries, the block's top-k (:func:`block_topk`) is merged into the running top-k (:func:`merge_topk`).
Only a ``[query block, gallery piece]`` similarity block is ever formed.

Order is total and deterministic: by similarity, descending, then by gallery index, ascending.

Example:
    >>> hits = search(train_X, train_y, unit_rows(test_X, "test_X", dev), k=20, block_size=4096,
    ...               piece_rows=65536, device=dev)              # [5000, 384], [5000], [1000, 384]
    >>> hits.similarities.shape, hits.indices.shape, hits.gallery_labels.shape
    (torch.Size([1000, 20]), torch.Size([1000, 20]), (5000,))
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from bobench.protocols.base import Features

__all__ = ["Neighbours", "block_topk", "gallery_pieces", "merge_topk", "search", "unit_rows"]


@dataclass
class Neighbours:
    """What :func:`search` returns: per query (rows in query order) its top-k gallery rows.

    Attributes:
        similarities: ``[Q, k]`` cosine similarities, ordered by (similarity desc, index asc).
        indices: ``[Q, k]`` gallery row indices, in the same order.
        gallery_labels: ``[N]`` int64 labels of the whole gallery, as read with its rows.
        boundary_ties: query-block rows whose k-th place was an exact tie (resolved by gallery index).
    """

    similarities: torch.Tensor
    indices: torch.Tensor
    gallery_labels: np.ndarray
    boundary_ties: int


def search(
    gallery: np.ndarray | Features,
    labels: np.ndarray | None,
    queries: torch.Tensor,
    k: int,
    *,
    block_size: int,
    piece_rows: int,
    device: torch.device,
    what: str = "gallery features",
) -> Neighbours:
    """Every query's top ``k`` gallery rows, in one pass over the gallery.

    Args:
        gallery: ``[N, D]`` array (then ``labels`` ``[N]``) or :class:`Features` (``labels`` None).
        queries: ``[Q, D]`` unit rows on ``device`` (:func:`unit_rows`).
        k: neighbours kept per query (at most N).
        block_size: queries per similarity block. piece_rows: gallery rows per piece.
        device: where the similarities are computed. what: names the gallery in errors.

    Raises:
        ValueError: non-finite gallery features, or a gallery that yields fewer or more rows than its
            declared ``n``.
    """
    n_q = len(queries)
    vals = torch.empty(n_q, 0, device=device)
    idx = torch.empty(n_q, 0, dtype=torch.long, device=device)
    labels_seen: list[np.ndarray] = []
    offset, ties = 0, 0
    for piece, piece_y in gallery_pieces(gallery, labels, piece_rows):
        labels_seen.append(np.asarray(piece_y, dtype=np.int64))
        g = unit_rows(piece, what, device)
        new_v, new_i = [], []
        for s in range(0, n_q, block_size):
            v, i, t = block_topk(queries[s : s + block_size] @ g.T, k)
            new_v.append(v)
            new_i.append(i + offset)
            ties += t
        if offset == 0:  # the first piece: nothing to merge with
            vals, idx = torch.cat(new_v), torch.cat(new_i)
        else:
            vals, idx = merge_topk(vals, idx, torch.cat(new_v), torch.cat(new_i), k)
        offset += len(g)
    n_gallery = len(gallery) if isinstance(gallery, np.ndarray) else gallery.n
    if offset != n_gallery:
        raise ValueError(f"the gallery yielded {offset} rows but declares n={n_gallery}")
    return Neighbours(vals, idx, np.concatenate(labels_seen), ties)


def unit_rows(x: np.ndarray, what: str, dev: torch.device) -> torch.Tensor:
    """``x`` [n, D] as float32 rows of unit L2 norm on ``dev`` (zero rows stay zero), as F.normalize.

    The norms double as the finiteness check: a NaN or inf anywhere in a row makes its norm non-finite.
    """
    arr = np.ascontiguousarray(x, dtype=np.float32)
    if not arr.flags.writeable:  # a read-only memory map: copy the piece (torch wants writable memory)
        arr = arr.copy()
    t = torch.from_numpy(arr).to(dev)
    norms = torch.linalg.vector_norm(t, dim=1, keepdim=True)
    if not bool(torch.isfinite(norms).all()):
        raise ValueError(f"{what} contains NaN or inf features (or rows whose norm overflows float32)")
    return t / norms.clamp_min(1e-12)  # out of place: never write into the caller's array


def gallery_pieces(
    train_X: np.ndarray | Features, train_y: np.ndarray | None, rows: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Gallery rows in order, in pieces of ``rows`` (the last may be shorter), cut from shards or joined
    across them: fewer, larger pieces mean fewer top-k merges. A memory map is read one piece at a time."""
    shards = [(train_X, train_y)] if isinstance(train_X, np.ndarray) else train_X.iter_shards()
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    have = 0
    for X, y in shards:
        start = 0
        while start < len(y):
            take = min(rows - have, len(y) - start)
            xs.append(X[start : start + take])
            ys.append(y[start : start + take])
            have, start = have + take, start + take
            if have == rows:
                yield _join(xs), _join(ys)
                xs, ys, have = [], [], 0
    if have:
        yield _join(xs), _join(ys)


def _join(parts: list[np.ndarray]) -> np.ndarray:
    return parts[0] if len(parts) == 1 else np.concatenate(parts)  # one part: stays a lazy memmap slice


def block_topk(sims: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Top-k of each row of ``sims`` [b, g], ordered by (value desc, column asc); and the tie count.

    ``torch.topk`` returns the right *values*, but among equal values at the k-th place it may pick any
    columns. Taking k + 1 detects that case for free (the k-th and (k+1)-th values are equal); those
    rows (rare: duplicated images) are redone with a stable full sort, the others have a unique top-k
    set that only needs ordering.
    """
    g = sims.shape[1]
    if k >= g:
        v, cols = sims.sort(dim=1, descending=True, stable=True)
        return v, cols, 0
    v, i = sims.topk(k + 1, dim=1, sorted=False)
    two_smallest = v.topk(2, dim=1, largest=False).values  # (k+1)-th and k-th largest of the row
    tied = (two_smallest[:, 0] == two_smallest[:, 1]).nonzero().squeeze(1)
    i, order = i.sort(dim=1)  # column order first, so the stable value sort breaks ties by column
    v, order = v.gather(1, order).sort(dim=1, descending=True, stable=True)
    v, i = v[:, :k].contiguous(), i.gather(1, order)[:, :k].contiguous()
    if len(tied):
        v_t, i_t = sims[tied].sort(dim=1, descending=True, stable=True)
        v[tied], i[tied] = v_t[:, :k], i_t[:, :k]
    return v, i, len(tied)


def merge_topk(
    vals: torch.Tensor, idx: torch.Tensor, new_v: torch.Tensor, new_i: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two (value desc, index asc)-ordered lists; every index in ``new_i`` exceeds those in ``idx``.

    In the concatenation, equal values therefore appear in index order, and a stable sort keeps it.
    """
    cat_v, cat_i = torch.cat([vals, new_v], dim=1), torch.cat([idx, new_i], dim=1)
    cat_v, order = cat_v.sort(dim=1, descending=True, stable=True)
    return cat_v[:, :k], cat_i.gather(1, order)[:, :k]
