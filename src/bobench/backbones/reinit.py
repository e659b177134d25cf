"""Random re-initialisation of a model that was built with weights it cannot be told not to load.

A random-init control must be random: a user callable (``random/mypkg.models:make_net``) that loads
its weights itself and takes no ``pretrained=`` keyword would otherwise hand back the pretrained
network under a "random" card, and every pretrained-vs-random comparison would compare a model with
itself. :func:`reinitialize` re-initialises such a model the way its own layers initialise
themselves, and refuses (:class:`RandomInitError`) when it cannot cover every parameter.
"""

from __future__ import annotations

import torch
from torch import nn

from bobench.backbones.weights import state_digest


class RandomInitError(RuntimeError):
    """A random-init control was asked for, but the model's weights could not all be re-initialised."""


def reinitialize(model: nn.Module, what: str) -> str:
    """Re-initialise every parameter of ``model`` in place, under the caller's torch RNG state.

    Each module's own ``reset_parameters()`` runs (BatchNorm's also resets its running statistics;
    a norm layer with only ``reset_running_stats()`` gets that), then a timm-style ``init_weights()``
    on the root model where it has one (it covers tokens and position embeddings that belong to no
    layer). A parameter that no ``reset_parameters()`` owns must have changed after ``init_weights()``;
    the weights digest must differ from the one the model was built with.

    Args:
        model: the model as built (typically with pretrained weights loaded).
        what: the backbone spec, for the error message.

    Returns:
        The new weights digest (:func:`~bobench.backbones.weights.state_digest`).

    Raises:
        RandomInitError: some parameter is owned by a module without ``reset_parameters()`` and was not
            changed by ``init_weights()``, or the digest did not change; the message names the
            parameters and the fix (accept a ``pretrained`` keyword).
    """
    before_digest = state_digest(model)
    owned_by_reset: set[int] = set()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        for module in model.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
                owned_by_reset.update(id(p) for p in module.parameters(recurse=False))
            elif callable(getattr(module, "reset_running_stats", None)):
                module.reset_running_stats()
        init = getattr(model, "init_weights", None)
        if callable(init):
            init()
    uncovered = [
        name
        for name, p in model.named_parameters()
        if id(p) not in owned_by_reset and p.numel() and torch.equal(p.detach(), before[name])
    ]
    after_digest = state_digest(model)
    if uncovered or after_digest == before_digest:
        listed = ", ".join(uncovered[:8]) + (f" and {len(uncovered) - 8} more" if len(uncovered) > 8 else "")
        why = (
            f"parameter(s) {listed} belong to no layer with reset_parameters()"
            if uncovered
            else ("its weights did not change")
        )
        raise RandomInitError(
            f"cannot build a random-init control of {what}: it loads its own weights and takes no "
            f"`pretrained` keyword, and re-initialising it failed ({why}). Give the callable a "
            "`pretrained: bool` keyword that builds the model without loading weights when False "
            "(bobench passes pretrained=False for random/ controls), or give those modules a "
            "reset_parameters() method."
        )
    return after_digest
