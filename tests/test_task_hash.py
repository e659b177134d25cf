"""A task's ``config_hash`` (and so a cell's identity in the results store) follows what changes scores.

Everything that can change a score changes the hash, so a changed task makes new cells instead of
overwriting old scores; a new description does not, and run options (device, batch size, ...) cannot:
they are not task fields at all.
"""

from __future__ import annotations

import dataclasses

import pytest
from pydantic import ValidationError

from bobench.options import RunOptions
from bobench.runner import plan
from bobench.task import TaskConfig, load_task

BASE = load_task("patches13-linear")

# One change per field that changes scores (each differs from the built-in task's value).
CHANGES = {
    "version": {"version": BASE.version + 1},
    "param value": {"params": {**BASE.params, "num_C": BASE.params["num_C"] + 1}},
    "new param": {"params": {**BASE.params, "max_iter": 10}},
    "metrics": {"metrics": BASE.metrics[:-1]},
    "primary": {"primary": "top5"},
    "seeds": {"seeds": (0, 1)},
    "image_size": {"image_size": BASE.image_size + 16},
    "dataset": {"dataset": "mnist5k"},
    "protocol": {"protocol": "knn"},
    "splits": {"splits": ("train", "test")},
    "ood": {"ood": {"shifted": "patches13"}},
}


def _changed(**update: object) -> TaskConfig:
    task = BASE.model_copy(update=update)
    for name, value in update.items():  # model_copy does not validate: check the change took
        assert getattr(task, name) == value != getattr(BASE, name), name
    return task


def _cell_hash(task: TaskConfig, seed: int = 0) -> str:
    [planned] = plan(["timm:resnet18"], [task], seeds=[seed])
    return planned.cell.config_hash


def test_hash_is_stable() -> None:
    assert BASE.config_hash() == load_task("patches13-linear").config_hash()
    assert BASE.config_hash() == BASE.model_copy().config_hash()
    assert _cell_hash(BASE) == _cell_hash(load_task("patches13-linear"))


@pytest.mark.parametrize("change", CHANGES, ids=list(CHANGES))
def test_every_score_changing_field_changes_the_hash(change: str) -> None:
    assert _changed(**CHANGES[change]).config_hash() != BASE.config_hash()


def test_each_change_gives_its_own_hash() -> None:
    hashes = {name: _changed(**update).config_hash() for name, update in CHANGES.items()}
    assert len({*hashes.values(), BASE.config_hash()}) == len(CHANGES) + 1, hashes


def test_every_field_but_description_is_covered() -> None:
    """A field added to TaskConfig must be added to CHANGES (or excluded from the hash on purpose)."""
    covered = {next(iter(update)) for update in CHANGES.values()} | {"name", "description"}
    assert covered == set(TaskConfig.model_fields)


def test_name_changes_the_hash() -> None:
    assert _changed(name="patches13-linear-copy").config_hash() != BASE.config_hash()


def test_description_does_not_change_the_hash() -> None:
    task = _changed(description="a new line for listings")
    assert task.config_hash() == BASE.config_hash()
    assert _cell_hash(task) == _cell_hash(BASE)


def test_run_options_are_not_task_fields() -> None:
    run_only = {f.name for f in dataclasses.fields(RunOptions)}
    assert {"device", "batch_size", "num_workers"} <= run_only
    assert not run_only & set(TaskConfig.model_fields)
    for name, value in [("device", "cuda"), ("batch_size", 8), ("num_workers", 2)]:
        with pytest.raises(ValidationError, match=name):  # extra="forbid": a task file cannot set them
            TaskConfig.model_validate({**BASE.model_dump(), name: value})


def test_cell_hash_follows_task_version_and_seed() -> None:
    base = _cell_hash(BASE)
    assert _cell_hash(_changed(version=BASE.version + 1)) != base
    assert _cell_hash(BASE, seed=1) != base
    assert _cell_hash(_changed(params={**BASE.params, "num_C": 3})) != base
    [a, b] = plan(["timm:resnet18", "timm:resnet50"], [BASE], seeds=[0])
    assert a.cell.config_hash != b.cell.config_hash  # the backbone is in it too
