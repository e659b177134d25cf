"""Evaluation protocols, one module each, looked up by name through a lazy registry.

Every protocol is ``run(data: ProbeData, params: Mapping, seed: int, options: RunOptions | None = None)
-> ProtocolResult`` (the contract: :mod:`bobench.protocols.base`). The runner passes the run options
(device, ...) to every protocol; they are never task parameters.
"""

from __future__ import annotations

from bobench.registry import Registry

#: name → ``module:run``
PROTOCOLS = Registry("protocol")
# accepts_metrics: the runner passes the task's registered metric names as params["metrics"] (the
# protocol computes only those)
PROTOCOLS.register("linear", "bobench.protocols.linear:run", needs="pooled features", accepts_metrics=True)
PROTOCOLS.register("knn", "bobench.protocols.knn:run", needs="pooled features")
PROTOCOLS.register("fewshot", "bobench.protocols.fewshot:run", needs="pooled features")
PROTOCOLS.register("retrieval", "bobench.protocols.retrieval:run", needs="pooled features")
PROTOCOLS.register("ood", "bobench.protocols.ood:run", needs="pooled features", accepts_metrics=True)


def get_protocol(name: str):
    """The ``run`` function of protocol ``name`` (did-you-mean on a typo)."""
    return PROTOCOLS.load(name)
