"""CheXpert: the reader on a tiny copy of the published layout, multi-label datasets and features, the
multi-label metrics against scikit-learn, and a battle of the linear probe on it end to end.

The fixture writes ``train.csv``/``valid.csv`` with the released header, frontal and lateral views, and
every label value (1.0, 0.0, -1.0, empty), with real photo crops (scikit-image's camera) as 32 px JPEGs.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score

from bobench.data import DatasetError, load_dataset
from bobench.data.chexpert import LABELS, UNCERTAIN_AS, apply_policy, patient_id
from bobench.metrics import METRICS, multilabel_metrics, undefined_labels

HEADER = [
    *("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", "Enlarged Cardiomediastinum"),
    *("Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis"),
    *("Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices"),
]  # the released column order
VALUES = ("1.0", "0.0", "-1.0", "")
# BoB's policy, written out value by value: uncertain -> 1 for Atelectasis and Edema, 0 for the rest.
POLICY = {
    "Atelectasis": {"1.0": 1, "0.0": 0, "-1.0": 1, "": 0},
    "Cardiomegaly": {"1.0": 1, "0.0": 0, "-1.0": 0, "": 0},
    "Consolidation": {"1.0": 1, "0.0": 0, "-1.0": 0, "": 0},
    "Edema": {"1.0": 1, "0.0": 0, "-1.0": 1, "": 0},
    "Pleural Effusion": {"1.0": 1, "0.0": 0, "-1.0": 0, "": 0},
}
N_TRAIN_PATIENTS, N_VALID_PATIENTS = 10, 4


def _write_csv(path: Path, rows: list[dict[str, str]], header: list[str] = HEADER) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _row(path: str, view: str, k: int) -> dict[str, str]:
    """A CSV row; the k-th frontal row takes value (k + column) mod 4, so each finding sees all four."""
    row = {h: "" for h in HEADER}
    row.update({"Path": path, "Sex": "Female", "Age": "60", "Frontal/Lateral": view})
    row["AP/PA"] = "AP" if view == "Frontal" else ""
    for j, name in enumerate(HEADER[5:]):
        row[name] = VALUES[(k + j) % 4]
    return row


def write_chexpert(root: Path, folder: str = "CheXpert-v1.0-small") -> Path:
    """A tiny CheXpert-v1.0-small under ``root/folder``; returns that folder."""
    from skimage import data

    camera = data.camera()  # 512 x 512 grayscale photo
    base = root / folder
    counter = {"frontal": 0, "image": 0}

    def image(rel: str) -> None:
        i = counter["image"]
        counter["image"] += 1
        y, x = (i * 37) % 384, (i * 91) % 384
        path = base / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(camera[y : y + 128, x : x + 128]).resize((32, 32)).save(path, quality=90)

    for split, first, n in (("train", 1, N_TRAIN_PATIENTS), ("valid", 64541, N_VALID_PATIENTS)):
        rows = []
        for p in range(first, first + n):
            for study in (1, 2) if split == "train" else (1,):
                for view, name in (("Frontal", "view1_frontal.jpg"), ("Lateral", "view2_lateral.jpg")):
                    rel = f"{split}/patient{p:05d}/study{study}/{name}"
                    image(rel)
                    k = counter["frontal"] if view == "Frontal" else counter["frontal"] + 1
                    counter["frontal"] += view == "Frontal"
                    rows.append(_row(f"CheXpert-v1.0-small/{rel}", view, k))
        _write_csv(base / f"{split}.csv" if split == "train" else base / "valid.csv", rows)
    return base


@pytest.fixture(scope="module")
def chexpert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_chexpert(tmp_path_factory.mktemp("chexpert"))


def _csv_rows(path: Path) -> dict[str, dict[str, str]]:
    """CSV rows by item path relative to the dataset folder."""
    with open(path, newline="") as f:
        return {r["Path"].split("/", 1)[1]: r for r in csv.DictReader(f)}


# ------------------------------------------------------------------------------------------ the reader


def test_uncertainty_policy_value_by_value(chexpert: Path) -> None:
    assert LABELS == ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
    assert {name: UNCERTAIN_AS[name] for name in LABELS} == {n: POLICY[n]["-1.0"] for n in LABELS}
    codes = {"1.0": 1, "0.0": 0, "-1.0": -1, "": -2}
    for value, code in codes.items():
        got = apply_policy(np.full((1, 5), code))[0].tolist()
        assert got == [POLICY[n][value] for n in LABELS], value
    # and through the reader, every item of every split against its CSV row
    for split, csv_name in (("train", "train.csv"), ("val", "train.csv"), ("test", "valid.csv")):
        ds = load_dataset(f"chexpert:{chexpert}?val_fraction=0.3", split=split)
        rows = _csv_rows(chexpert / csv_name)
        seen = set()
        for i in range(len(ds)):
            row = rows[ds.item_id(i)]
            expected = [POLICY[n][row[n]] for n in LABELS]
            assert ds.targets[i].tolist() == expected
            seen |= {(n, row[n]) for n in LABELS}
        if split != "val":
            assert seen == {(n, v) for n in LABELS for v in VALUES}  # every value of every finding met


def test_multilabel_dataset_contract(chexpert: Path) -> None:
    ds = load_dataset(f"chexpert:{chexpert}", split="test")
    assert ds.multilabel and ds.classes == list(LABELS)
    assert ds.targets.shape == (N_VALID_PATIENTS, 5) and ds.targets.dtype == np.int64
    image, target = ds[0]
    assert image.size == (32, 32) and image.mode == "RGB"
    assert isinstance(target, torch.Tensor) and target.dtype == torch.float32 and target.shape == (5,)
    assert target.tolist() == ds.targets[0].tolist()
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=lambda b: b)))
    assert len(batch) == 3
    assert not load_dataset("digits", split="val").multilabel  # single-label datasets are unchanged


def test_frontal_views_only_unless_views_all(chexpert: Path) -> None:
    for split in ("train", "val", "test"):
        ds = load_dataset(f"chexpert:{chexpert}?val_fraction=0.3", split=split)
        assert all(ds.item_id(i).endswith("_frontal.jpg") for i in range(len(ds)))
    test_all = load_dataset(f"chexpert:{chexpert}?views=all", split="test")
    assert len(test_all) == 2 * N_VALID_PATIENTS
    assert sum(test_all.item_id(i).endswith("_lateral.jpg") for i in range(len(test_all))) == N_VALID_PATIENTS
    frontal = load_dataset(f"chexpert:{chexpert}", split="test")
    assert frontal.manifest_hash != test_all.manifest_hash
    with pytest.raises(DatasetError, match=r"views='side' is unknown.*frontal or all"):
        load_dataset(f"chexpert:{chexpert}?views=side", split="test")


def _patients(ds) -> set[str]:
    return {patient_id(ds.item_id(i)) for i in range(len(ds))}


def test_train_and_val_split_by_patient(chexpert: Path) -> None:
    spec = f"chexpert:{chexpert}?val_fraction=0.3&seed=1"
    train, val = load_dataset(spec, split="train"), load_dataset(spec, split="val")
    assert not _patients(train) & _patients(val)
    assert len(_patients(train) | _patients(val)) == N_TRAIN_PATIENTS and len(_patients(val)) == 3
    assert len(train) + len(val) == 2 * N_TRAIN_PATIENTS  # every frontal image once (2 studies each)
    # all studies of a patient stay together, views=all moves no patient, and the seed is honoured
    everything = load_dataset(f"{spec}&views=all", split="val")
    assert _patients(everything) == _patients(val) and len(everything) == 2 * len(val)
    assert load_dataset(spec, split="val").manifest_hash == val.manifest_hash
    other = [
        _patients(load_dataset(f"chexpert:{chexpert}?val_fraction=0.3&seed={s}", "val")) for s in range(6)
    ]
    assert len({frozenset(p) for p in other}) > 1
    test = load_dataset(f"chexpert:{chexpert}", split="test")
    assert not _patients(test) & (_patients(train) | _patients(val))
    with pytest.raises(DatasetError, match="no 'val' split with val_fraction=0"):
        load_dataset(f"chexpert:{chexpert}?val_fraction=0", split="val")


def test_renamed_root_and_paths_relative_to_the_root(chexpert: Path, tmp_path: Path) -> None:
    renamed = tmp_path / "my-chexpert"
    shutil.copytree(chexpert, renamed)  # copy2 keeps sizes and mtimes: the same content
    ds = load_dataset(f"chexpert:{renamed}", split="test")
    assert ds.manifest_hash == load_dataset(f"chexpert:{chexpert}", split="test").manifest_hash
    # Path values relative to the dataset folder itself
    with open(renamed / "valid.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["Path"] = r["Path"].split("/", 1)[1]
    _write_csv(renamed / "valid.csv", rows)
    assert load_dataset(f"chexpert:{renamed}", split="test").manifest_hash == ds.manifest_hash


def _tiny_csv(root: Path, rows: list[dict[str, str]], header: list[str] = HEADER) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    _write_csv(root / "valid.csv", rows, header)
    _write_csv(root / "train.csv", rows, header)
    return root


def test_malformed_csv_names_file_line_and_fix(tmp_path: Path) -> None:
    rows = [
        _row(f"CheXpert-v1.0-small/valid/patient{p:05d}/study1/view1_frontal.jpg", "Frontal", p)
        for p in (1, 2, 3)
    ]
    no_edema = _tiny_csv(tmp_path / "a", rows, [h for h in HEADER if h != "Edema"])
    with pytest.raises(DatasetError) as err:
        load_dataset(f"chexpert:{no_edema}", split="test")
    msg = str(err.value)
    assert f"{no_edema / 'valid.csv'} line 1" in msg and "lacks column(s) Edema" in msg and "restore" in msg
    rows[1]["Cardiomegaly"] = "2.0"
    bad_value = _tiny_csv(tmp_path / "b", rows)
    with pytest.raises(DatasetError) as err:
        load_dataset(f"chexpert:{bad_value}", split="test")
    msg = str(err.value)
    assert f"{bad_value / 'valid.csv'} line 3" in msg and "Cardiomegaly is '2.0'" in msg
    assert "-1.0 (uncertain)" in msg and "fix the value" in msg
    rows[1]["Cardiomegaly"], rows[2]["Frontal/Lateral"] = "1.0", "Sideways"
    with pytest.raises(DatasetError, match=r"line 4: Frontal/Lateral is 'Sideways'"):
        load_dataset(f"chexpert:{_tiny_csv(tmp_path / 'c', rows)}", split="test")


def test_missing_image_names_csv_line_and_both_candidates(chexpert: Path, tmp_path: Path) -> None:
    root = tmp_path / "CheXpert-v1.0-small"
    shutil.copytree(chexpert, root)
    (root / "valid" / "patient64542" / "study1" / "view1_frontal.jpg").unlink()
    with pytest.raises(DatasetError) as err:
        load_dataset(f"chexpert:{root}", split="test")
    msg = str(err.value)
    assert f"{root / 'valid.csv'} line 4" in msg  # header, then patient64541's two views
    assert f"neither {root}/valid/patient64542/study1/view1_frontal.jpg" in msg
    assert f"nor {root}/CheXpert-v1.0-small/valid/patient64542/study1/view1_frontal.jpg" in msg
    with pytest.raises(DatasetError, match=r"CheXpert CSV .*train\.csv does not exist"):
        load_dataset(f"chexpert:{tmp_path}", split="train")
    with pytest.raises(DatasetError, match=r"CheXpert folder .*nothing does not exist"):
        load_dataset(f"chexpert:{tmp_path / 'nothing'}", split="train")


def test_multilabel_features_are_cached_as_label_matrices(chexpert: Path, tmp_path: Path) -> None:
    from bobench import create_backbone
    from bobench.features import ExtractOptions, FeatureStore

    ds = load_dataset(f"chexpert:{chexpert}?val_fraction=0.3", split="train")
    store = FeatureStore(tmp_path / "cache")
    options = ExtractOptions(device="cpu", num_workers=0, image_size=32, shard_size=5, progress=False)
    fs = store.get_or_extract(create_backbone("user_models:make_declared"), ds, options)
    X, y = fs.load()
    assert X.shape == (len(ds), fs.dim) and y.shape == (len(ds), 5) and fs.labels.shape == (len(ds), 5)
    np.testing.assert_array_equal(y, ds.targets)
    shard = np.load(fs.path / fs.manifest["shards"][0]["labels"])
    assert shard.shape == (5, 5) and fs.classes == list(LABELS)


# ----------------------------------------------------------------------------------------- the metrics


def test_multilabel_metrics_equal_sklearn_on_a_hand_made_set() -> None:
    names = ["a", "b", "c"]
    targets = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0], [1, 0, 0], [0, 1, 0]])
    scores = np.array(
        [[0.9, 0.2, 0.1], [0.3, 0.8, 0.4], [0.6, 0.4, 0.3], [0.4, 0.5, 0.2], [0.2, 0.1, 0.9], [0.5, 0.7, 0.5]]
    )
    got = {m.name: m.value for m in multilabel_metrics(scores, targets, names)}
    auroc = [roc_auc_score(targets[:, j], scores[:, j]) for j in (0, 1)]  # c: no positive, undefined
    assert got["auroc@label=a"] == pytest.approx(auroc[0]) and got["auroc@label=b"] == pytest.approx(auroc[1])
    assert auroc[0] == pytest.approx(6 / 9)  # by hand: 0.9 and 0.6 outrank all 3 negatives, 0.2 none
    assert got["mean_auroc"] == pytest.approx(np.mean(auroc))
    ap = [average_precision_score(targets[:, j], scores[:, j]) for j in (0, 1)]
    assert got["mean_ap"] == pytest.approx(np.mean(ap))
    assert "auroc@label=c" not in got and all(math.isfinite(v) for v in got.values())
    assert undefined_labels(targets, names) == {"auroc": ["c"], "ap": ["c"]}
    assert METRICS["mean_auroc"].higher_is_better and METRICS["mean_ap"].multilabel


# ---------------------------------------------------------------------------------------- end to end


def test_battle_of_the_linear_probe_on_chexpert(chexpert: Path, tmp_path: Path) -> None:
    from bobench.options import RunOptions
    from bobench.runner import run_battle
    from bobench.store import ResultStore

    task = tmp_path / "chexpert-linear.yaml"
    task.write_text(
        textwrap.dedent(
            f"""
            version: 1
            dataset: chexpert:{chexpert}?val_fraction=0.3
            protocol: linear
            params: {{num_C: 4}}
            metrics: [mean_auroc, mean_ap, auroc@label=Edema]
            primary: mean_auroc
            image_size: 32
            """
        )
    )
    with ResultStore(tmp_path / "r.db") as store:
        summary = run_battle(
            ["random/mobilenetv2_100"],
            [task],
            store=store,
            cache_dir=tmp_path / "cache",
            options=RunOptions(num_workers=0, progress=False),
        )
        rows = store.results(status=None)
    assert (summary.done, summary.failed) == (1, 0), rows.get("error")
    assert set(rows["status"]) == {"ok"}
    assert set(rows["metric"]) == {"mean_auroc", "mean_ap", "auroc@label=Edema"}
    value = rows.loc[rows.metric == "mean_auroc", "value"].iloc[0]
    assert math.isfinite(value) and 0.0 <= value <= 1.0
    config = json.loads(rows["config_json"].iloc[0])
    assert config["info"]["selection"] == "val" and len(config["info"]["val_mean_auroc"]) == 4
    preds = pd.read_parquet(config["predictions"])
    assert len(preds) == 5 * N_VALID_PATIENTS and list(preds["label_name"][:5]) == list(LABELS)


def test_multilabel_labels_survive_the_device_normalised_path(
    chexpert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On an accelerator the workers send uint8 images and the device normalises (run here on the CPU,
    treated as one): a multi-label set gives the same features and label matrices as the workers path."""
    from bobench import create_backbone, input_cache
    from bobench.features import ExtractOptions, FeatureStore

    ds = load_dataset(f"chexpert:{chexpert}?val_fraction=0.3", split="train")
    bb = create_backbone("random/timm:test_resnet")
    options = ExtractOptions(device="cpu", num_workers=0, image_size=32, shard_size=5, progress=False)
    plain = FeatureStore(tmp_path / "plain").get_or_extract(bb, ds, options)
    monkeypatch.setattr(input_cache, "NORMALISE_ON_DEVICE", frozenset({"cpu"}))
    device = FeatureStore(tmp_path / "device").get_or_extract(bb, ds, options)
    assert (plain.stats["normalised_on"], device.stats["normalised_on"]) == ("workers", "device")
    (X, y), (Xd, yd) = plain.load(), device.load()
    np.testing.assert_array_equal(Xd, X)
    np.testing.assert_array_equal(yd, y)
    assert yd.shape == (len(ds), 5)
    np.testing.assert_array_equal(yd, ds.targets)
