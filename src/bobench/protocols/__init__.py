"""Evaluation protocols, one module each, looked up by name through a lazy registry.

Each declares its *kind* (the contract: :mod:`bobench.protocols.base`):

* ``frozen``: ``run(data: ProbeData, params, seed, options) -> ProtocolResult`` on cached features
  (one forward pass per backbone and dataset, shared by every frozen protocol);
* ``trained``: ``run(backbone, data: TrainData, params, seed, options, checkpoint_dir) -> ProtocolResult``
  trains a fresh backbone for the cell (:mod:`bobench.training`).

The runner passes the run options (device, ...) to every protocol; they are never task parameters.
"""

from __future__ import annotations

from bobench.registry import Registry

#: name → ``module:run``
PROTOCOLS = Registry("protocol")
# accepts_metrics: the runner passes the task's registered metric names as params["metrics"] (the
# protocol computes only those)
# params: the protocol's parameter check, run on every task before any work (a typo is a usage error)
_FROZEN = {"kind": "frozen", "needs": "pooled features"}
PROTOCOLS.register(
    "linear", "bobench.protocols.linear:run", accepts_metrics=True,
    params="bobench.protocols.linear:resolve_params", **_FROZEN,
)  # fmt: skip
PROTOCOLS.register(
    "knn", "bobench.protocols.knn:run", params="bobench.protocols.knn:resolve_params", **_FROZEN
)
PROTOCOLS.register(
    "fewshot", "bobench.protocols.fewshot:run", params="bobench.protocols.fewshot:resolve_params", **_FROZEN
)
PROTOCOLS.register(
    "retrieval",
    "bobench.protocols.retrieval:run",
    params="bobench.protocols.retrieval:resolve_params",
    **_FROZEN,
)
PROTOCOLS.register(
    "ood", "bobench.protocols.ood:run", accepts_metrics=True,
    params="bobench.protocols.linear:resolve_params", **_FROZEN,
)  # fmt: skip
PROTOCOLS.register(
    "finetune", "bobench.protocols.finetune:run", kind="trained", needs="images",
    params="bobench.protocols.finetune:resolve_params",
)  # fmt: skip
# data="detection": the datasets are read with bobench.data.load_detection_dataset (COCO-format targets)
PROTOCOLS.register(
    "detection", "bobench.protocols.detection:run", kind="trained", needs="images", data="detection",
    params="bobench.protocols.detection:resolve_params",
)  # fmt: skip


def protocol_kind(name: str) -> str:
    """``"frozen"`` or ``"trained"`` (see the module docstring)."""
    return str(PROTOCOLS[name].meta.get("kind", "frozen"))


# data="segmentation": read with bobench.data.load_segmentation_dataset (image, class-index mask)
PROTOCOLS.register(
    "segmentation", "bobench.protocols.segmentation:run", kind="trained", needs="images", data="segmentation",
    params="bobench.protocols.segmentation:resolve_params",
)  # fmt: skip


def protocol_data(name: str) -> str:
    """How a trained protocol's datasets are read: ``"images"`` (classification), ``"detection"`` or
    ``"segmentation"``."""
    return str(PROTOCOLS[name].meta.get("data", "images"))


def get_protocol(name: str):
    """The ``run`` function of protocol ``name`` (did-you-mean on a typo)."""
    return PROTOCOLS.load(name)
