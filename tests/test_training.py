"""The trainer: resume bit-equal after a kill, accumulation equals a big batch, val selection, atomic files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bobench.checkpoints import Checkpoints
from bobench.options import RunOptions
from bobench.seeding import seed_for
from bobench.training import Trainer

OPTS = RunOptions(device="cpu", num_workers=0, progress=False, checkpoint_minutes=None)


class Blobs(torch.utils.data.Dataset):
    """64 random 8x8 "images" in 4 classes, with a random flip as augmentation (so the seeding matters)."""

    def __init__(self, n: int = 64) -> None:
        g = torch.Generator().manual_seed(0)
        self.y = torch.arange(n) % 4
        self.x = torch.randn(n, 3, 8, 8, generator=g) + self.y.view(-1, 1, 1, 1).float()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        x = self.x[i]
        if torch.rand(()) < 0.5:  # drawn from the global generator, which the trainer seeds per sample
            x = x.flip(-1)
        return x, int(self.y[i])


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )  # fmt: skip


class Killed(Exception):
    pass


def _trainer(
    model: nn.Module, ckpt: Path | None, *, kill_at: int | None = None, every: int | None = None, **kw
):
    from timm.scheduler import create_scheduler_v2

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    sched, _ = create_scheduler_v2(
        opt, "cosine", num_epochs=3, warmup_epochs=1, step_on_epochs=False, updates_per_epoch=4
    )

    def on_update(n: int) -> None:
        if kill_at is not None and n == kill_at:
            raise Killed

    args = {"epochs": 3, "batch_size": 16, "options": OPTS, "seed": 7}
    return Trainer(
        model, opt, sched, nn.CrossEntropyLoss(), checkpoints=Checkpoints(ckpt) if ckpt else None,
        checkpoint_every=every, on_update=on_update, **{**args, **kw},
    )  # fmt: skip


# 4 updates per epoch: killed mid-epoch, at an epoch's last update (before its end-of-epoch checkpoint),
# and in the first update of the last epoch; the checkpoint before the kill decides where it resumes
@pytest.mark.parametrize(("kill_at", "resumes_at"), [(2, (0, 2)), (4, (0, 3)), (9, (2, 1))])
def test_resume_after_a_kill_is_bit_equal(tmp_path: Path, kill_at: int, resumes_at: tuple[int, int]) -> None:
    data = Blobs()
    clean = _model()
    _trainer(clean, None).fit(data)
    killed = _model()
    with pytest.raises(Killed):
        _trainer(killed, tmp_path / "ck", kill_at=kill_at, every=1).fit(data)
    resumed = _model()  # a new process: fresh model, optimizer, scheduler; only the checkpoint carries over
    result = _trainer(resumed, tmp_path / "ck", every=1).fit(data)
    assert result.resumed_from == resumes_at
    for (k, a), b in zip(clean.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    # and a different seed really trains differently
    other = _model()
    _trainer(other, None, seed=8).fit(data)
    assert not torch.equal(other[-1].weight, clean[-1].weight)


def test_accumulation_equals_one_big_batch() -> None:
    """Micro-batches of 4 with 4 accumulation steps give the update of batches of 16 (no BN/dropout)."""
    data = Blobs()

    def linear() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(192, 4))

    big, small = linear(), linear()
    _trainer(big, None, options=OPTS.replace(batch_size=16)).fit(data)
    _trainer(small, None, options=OPTS.replace(batch_size=4)).fit(data)
    for a, b in zip(big.parameters(), small.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_best_epoch_is_selected_on_val_and_returned() -> None:
    scores = iter([0.2, 0.9, 0.5])
    snapshots = []

    def evaluate(model: nn.Module) -> float:
        snapshots.append(model[-1].weight.detach().clone())
        return next(scores)

    result = _trainer(_model(), None, evaluate=evaluate).fit(Blobs())
    assert result.best_epoch == 1 and result.best_score == 0.9
    assert torch.equal(result.best_state["6.weight"], snapshots[1])  # the weights of that epoch, not the last
    assert [h["val"] for h in result.history] == [0.2, 0.9, 0.5]
    assert all(np.isfinite(h["loss"]) for h in result.history)


def test_checkpoint_of_another_run_is_refused(tmp_path: Path) -> None:
    _trainer(_model(), tmp_path / "ck").fit(Blobs())
    with pytest.raises(ValueError, match="another run"):
        _trainer(_model(), tmp_path / "ck", seed=99).fit(Blobs())


def test_checkpoints_are_atomic_and_load_without_pickle(tmp_path: Path) -> None:
    ck = Checkpoints(tmp_path)
    ck.save({"a": torch.ones(2), "n": 3})
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind
    assert ck.load()["n"] == 3
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"version": 1, "x": Evil()}))
    with pytest.raises(pickle.UnpicklingError):
        ck.load("evil")
    ck.clear()
    assert not tmp_path.exists()


def test_seed_for_is_stable() -> None:
    assert seed_for(1, "order", 0) == seed_for(1, "order", 0) != seed_for(1, "order", 1)
    assert 0 <= seed_for("x") < 2**63


def test_seed_all_on_the_cpu_draws_as_torch_manual_seed() -> None:
    """The cheap CPU-only seeding (per sample, per step) gives the streams torch.manual_seed gives."""
    import random

    from bobench.seeding import seed_all

    def draws() -> tuple:
        return random.random(), float(np.random.rand()), torch.rand(3).tolist()

    seed = seed_for(3, "sample", 1, 17)
    seed_all(seed)
    everywhere = draws()
    seed_all(seed, torch.device("cpu"))
    assert draws() == everywhere
    seed_all(seed + 1, torch.device("cpu"))
    assert draws() != everywhere


class DictTargets(torch.utils.data.Dataset):
    """Blobs with the label inside a dict, as detection datasets give their targets."""

    def __init__(self) -> None:
        self.blobs = Blobs()

    def __len__(self) -> int:
        return len(self.blobs)

    def __getitem__(self, i: int):
        x, y = self.blobs[i]
        return x, {"label": torch.tensor(y)}


def test_custom_forward_loss_and_collate_train_the_same_model() -> None:
    """A model that computes its own loss from list batches (the detection path) trains exactly as
    the default ``loss_fn(net(x), y)`` path on the same samples, draws and updates."""
    ce = nn.CrossEntropyLoss()

    def collate(items: list) -> tuple:
        images, targets = zip(*items, strict=True)
        return list(images), list(targets)

    def forward_loss(net: nn.Module, images: list, targets: list) -> torch.Tensor:
        assert isinstance(images, list) and isinstance(targets[0], dict)  # moved, structure kept
        return ce(net(torch.stack(images)), torch.stack([t["label"] for t in targets]))

    plain, custom = _model(), _model()
    _trainer(plain, None).fit(Blobs())
    _trainer(custom, None, forward_loss=forward_loss, collate_fn=collate).fit(DictTargets())
    for k, v in plain.state_dict().items():
        assert torch.equal(custom.state_dict()[k], v), k
    assert not torch.equal(_model().state_dict()["0.weight"], plain.state_dict()["0.weight"])  # it trained
