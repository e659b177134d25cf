"""Readers for published dataset layouts, looked up by spec kind (``revisitop:/data/roxford5k``).

A reader is ``read(spec: DatasetSpec, split: str) -> FileItems``: it lists one split's files, labels
(``[N]`` class indices, or ``[N, L]`` 0/1 for a multi-label set such as ``chexpert``) and class names
(nothing decoded), optionally with per-item crop boxes (``FileItems.boxes``, e.g. the
revisitop query regions) and protocol data that is not a class label (``FileItems.extras``, e.g.
retrieval ground truth). It raises :class:`~bobench.data.errors.DatasetError` naming the file and the
fix for a missing or malformed file, and for a split the layout does not have.

Readers register here lazily (``kind → "module:function"``), so parsing a spec never imports them;
``options`` lists the extra ``?key=value`` options a reader accepts (kept in ``DatasetSpec.options``).
"""

from __future__ import annotations

from bobench.registry import Registry

READERS = Registry("dataset reader")
# retrieval (bobench.data.retrieval_readers, bobench.data.landmarks)
READERS.register("revisitop", "bobench.data.retrieval_readers:read_revisitop", options=("name",))
READERS.register("gldv2", "bobench.data.landmarks:read_gldv2", options=("usage",))
READERS.register("copydays", "bobench.data.landmarks:read_copydays", options=("queries",))
# OOD classification (bobench.data.ood_readers, bobench.data.objectnet)
READERS.register("imagenet-v2", "bobench.data.ood_readers:read_imagenet_v2", options=())
READERS.register("imagenet-sketch", "bobench.data.ood_readers:read_imagenet_sketch", options=())
READERS.register("imagenet-a", "bobench.data.ood_readers:read_imagenet_a", options=())
READERS.register("imagenet-r", "bobench.data.ood_readers:read_imagenet_r", options=())
READERS.register("objectnet", "bobench.data.objectnet:read_objectnet", options=())
READERS.register("visda", "bobench.data.ood_readers:read_visda", options=("domain",))
# multi-label classification (bobench.data.chexpert)
READERS.register("chexpert", "bobench.data.chexpert:read_chexpert", options=("views",))


def reader_options(kind: str) -> tuple[str, ...]:
    """The extra options reader ``kind`` accepts (empty for the built-in kinds)."""
    return tuple(READERS[kind].meta.get("options", ())) if kind in READERS else ()
