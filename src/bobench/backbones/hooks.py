"""Forward-hook helpers shared by adapters whose models expose no feature API of their own."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from bobench.backbones.base import PYRAMID_STRIDES


def probe_stages(model: nn.Module, side: int = 256) -> list[tuple[str, int, int]]:
    """Find ``(module name, channels, stride)`` of the last NCHW output at each stride 4/8/16/32.

    Runs one dummy forward of a ``side x side`` image with a hook on every submodule. In completion
    order the last module to emit a map of a given size is the outermost block of that stage, i.e. the
    stage output. Among modules emitting a map of one size, the shallowest ones are stage-level (a
    ``features.3`` block rather than the expansion conv ``features.4.conv.0`` that follows it at the same
    resolution), so the pick is the last emitter at the smallest nesting depth.
    ``side`` must be divisible by 32 and acceptable to the model.
    """
    order: list[tuple[str, tuple[int, ...]]] = []

    def record(name: str):
        def hook(_m: nn.Module, _i: object, out: object) -> None:
            if isinstance(out, torch.Tensor) and out.dim() == 4:
                order.append((name, tuple(out.shape)))

        return hook

    hooks = [mod.register_forward_hook(record(name)) for name, mod in model.named_modules() if name]
    was_training = model.training
    try:
        with torch.inference_mode():
            model.eval()(torch.zeros(1, 3, side, side))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    picked: list[tuple[str, int, int]] = []
    for s in PYRAMID_STRIDES:
        at = [(n, shape) for n, shape in order if shape[-2:] == (math.ceil(side / s),) * 2]
        if at:
            depth = min(n.count(".") for n, _ in at)
            name, shape = [(n, sh) for n, sh in at if n.count(".") == depth][-1]
            picked.append((name, shape[1], s))
    return picked


def capture(
    model: nn.Module, x: torch.Tensor, names: Sequence[str], head: nn.Module | None = None
) -> tuple[dict[str, torch.Tensor], object]:
    """Run ``model(x)`` and return the outputs of the named submodules (and, under the key ``"_head"``,
    the input of ``head``) together with the model's own output."""
    got: dict[str, torch.Tensor] = {}
    mods = dict(model.named_modules())
    hooks = [mods[n].register_forward_hook(lambda _m, _i, o, n=n: got.__setitem__(n, o)) for n in names]
    if head is not None:
        hooks.append(head.register_forward_pre_hook(lambda _m, i: got.__setitem__("_head", i[0])))
    try:
        out = model(x)
    finally:
        for h in hooks:
            h.remove()
    return got, out
