"""Evaluation protocols, one module each, looked up by name through a lazy registry."""

from __future__ import annotations

from bobench.registry import Registry

#: name → ``module:run``; ``run(data: ProbeData, params: Mapping, seed: int) -> ProtocolResult``
PROTOCOLS = Registry("protocol")
PROTOCOLS.register("linear", "bobench.protocols.linear:run", needs="pooled features", accepts_device=True)
PROTOCOLS.register("knn", "bobench.protocols.knn:run", needs="pooled features", accepts_device=True)
PROTOCOLS.register("fewshot", "bobench.protocols.fewshot:run", needs="pooled features")


def get_protocol(name: str):
    """The ``run`` function of protocol ``name`` (did-you-mean on a typo)."""
    return PROTOCOLS.load(name)
