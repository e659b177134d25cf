"""User backbones for the `<module>:<callable>` tests (importable as ``user_models`` from tests/)."""

from __future__ import annotations

import itertools

import torch
from torch import nn


class TinyNet(nn.Module):
    """A 4-stage CNN (strides 4, 8, 16, 32) returning pooled features, like a user's own model."""

    def __init__(self) -> None:
        super().__init__()
        chans = [8, 8, 16, 24, 32]  # a stride-2 stem, then four stride-2 stages
        layers: list[nn.Module] = [nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU()]
        for cin, cout in itertools.pairwise(chans):
            layers.append(nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.ReLU()))
        self.body = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(self.body(x)).flatten(1)


def make_net() -> nn.Module:
    return TinyNet()


def make_declared(pretrained: bool = False) -> nn.Module:
    """Declares its preprocessing the timm way, so no default-preprocessing warning is due."""
    net = TinyNet()
    net.pretrained_cfg = {
        "input_size": (3, 96, 96),
        "mean": (0.5, 0.5, 0.5),
        "std": (0.25, 0.25, 0.25),
        "interpolation": "bilinear",
        "crop_pct": 1.0,
    }
    net.was_pretrained = pretrained
    return net


def make_not_a_module():
    return "not a module"


class OOMNet(TinyNet):
    """Raises the out-of-memory error a GPU would when a forward batch exceeds ``limit`` images."""

    limit = 4

    def forward(self, x):
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory: batch {x.shape[0]} > {self.limit}")
        return super().forward(x)


def make_oom() -> nn.Module:
    net = OOMNet()
    net.pretrained_cfg = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    return net


class BrokenNet(TinyNet):
    """A backbone whose forward always fails, to check that a battle isolates it."""

    def forward(self, x):
        raise RuntimeError("this backbone is broken on purpose")


def make_broken() -> nn.Module:
    net = BrokenNet()
    net.pretrained_cfg = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    return net
