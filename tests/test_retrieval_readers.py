"""Readers of published retrieval layouts (revisitop, GLDv2, Copydays) on tiny fake releases."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bobench.data import DatasetError, load_dataset

# ------------------------------------------------------------------------------------------- helpers
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (120, 120, 120)]


def jpeg(path: Path, i: int = 0, size: tuple[int, int] = (32, 24)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, COLOURS[i % len(COLOURS)]).save(path, quality=90)


# ------------------------------------------------------------------------------------------ revisitop
DB = [f"db{i}" for i in range(5)]
QUERIES = ["q0", "q1"]
GND = [
    {"bbx": [2.0, 3.0, 20.0, 15.0], "easy": [0, 2], "hard": [1], "junk": [4]},
    {"bbx": [0.0, 0.0, 10.0, 24.0], "easy": [3], "hard": [], "junk": [0, 1]},
]


def gnd_dict(gnd: list[dict] | None = None) -> dict:
    return {"imlist": list(DB), "qimlist": list(QUERIES), "gnd": gnd if gnd is not None else GND}


def write_gnd(root: Path, data: object, name: str = "roxford5k", protocol: int = 4) -> Path:
    path = root / f"gnd_{name}.pkl"
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    return path


@pytest.fixture
def revisitop(tmp_path: Path) -> Path:
    root = tmp_path / "roxford5k"
    for i, name in enumerate(DB + QUERIES):
        jpeg(root / "jpg" / f"{name}.jpg", i)
    write_gnd(root, gnd_dict())
    return root


def test_revisitop_splits_boxes_and_ground_truth(revisitop: Path) -> None:
    db = load_dataset(f"revisitop:{revisitop}", split="train")
    assert [db.item_id(i) for i in range(len(db))] == [f"jpg/{n}.jpg" for n in DB]
    assert db.classes == ["revisitop"] and db.targets.tolist() == [0] * 5
    assert db.load_image(0).size == (32, 24)  # the database is not cropped
    assert "retrieval_gt" not in db.extras and db.extras["dataset"] == "roxford5k"

    q = load_dataset(f"revisitop:{revisitop}?name=roxford5k", split="test")
    assert [q.item_id(i) for i in range(len(q))] == ["jpg/q0.jpg", "jpg/q1.jpg"]
    assert q.classes == db.classes and q.targets.tolist() == [0, 0]
    assert q.load_image(0).size == (18, 12) and q.load_image(1).size == (10, 24)  # cropped to bbx
    assert q.extras == {
        "protocol": "revisitop",
        "dataset": "roxford5k",
        "retrieval_gt": [{k: g[k] for k in ("easy", "hard", "junk")} for g in GND],
    }


def test_revisitop_hash_follows_boxes(revisitop: Path) -> None:
    before = load_dataset(f"revisitop:{revisitop}", split="test").manifest_hash
    assert load_dataset(f"revisitop:{revisitop}", split="test").manifest_hash == before
    gnd = [dict(GND[0], bbx=[2.0, 3.0, 21.0, 15.0]), GND[1]]
    write_gnd(revisitop, gnd_dict(gnd))
    assert load_dataset(f"revisitop:{revisitop}", split="test").manifest_hash != before


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_revisitop_reads_builtin_pickles_of_any_protocol(revisitop: Path, protocol: int) -> None:
    data = gnd_dict([dict(g, bbx=tuple(g["bbx"])) for g in GND])  # tuples are read as lists
    write_gnd(revisitop, data, protocol=protocol)
    q = load_dataset(f"revisitop:{revisitop}", split="test")
    assert q.extras["retrieval_gt"][0] == {"easy": [0, 2], "hard": [1], "junk": [4]}
    assert q.load_image(0).size == (18, 12)


def test_revisitop_refuses_numpy_arrays(revisitop: Path) -> None:
    """numpy's rebuilding globals can forge object pointers from bytes, so arrays are refused, with a hint."""
    write_gnd(revisitop, gnd_dict([dict(g, easy=np.asarray(g["easy"])) for g in GND]))
    with pytest.raises(DatasetError, match=r"global 'numpy\.(_)?core\.\w+\.\w+'.*turned into lists"):
        load_dataset(f"revisitop:{revisitop}", split="test")


class Exploit:
    """Unpickling this would run a shell command that writes a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


class EvalExploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("exploit", [Exploit, EvalExploit])
def test_revisitop_refuses_code_in_pickle(revisitop: Path, tmp_path: Path, exploit: type) -> None:
    marker = tmp_path / "pwned"
    data = gnd_dict()
    data["gnd"] = [dict(GND[0], bbx=exploit(marker)), GND[1]]
    path = write_gnd(revisitop, data)
    with pytest.raises(
        DatasetError, match=r"refers to the global '(posix|os|nt|builtins)\.(system|eval)'"
    ) as err:
        load_dataset(f"revisitop:{revisitop}", split="test")
    assert str(path) in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("qimlist"), r"has no 'qimlist'; a revisitop gnd file is a dict"),
        (lambda d: d["gnd"][1].pop("junk"), r"gnd\[1\] \(query 'q1'\) lacks key 'junk'"),
        (lambda d: d["gnd"][0].update(easy=[0, 5]), r"gnd\[0\].*'easy' index 5 is out of range for the 5"),
        (lambda d: d["gnd"][0].update(hard=[-1]), r"'hard' index -1 is out of range"),
        (
            lambda d: d["gnd"][1].update(bbx=[0.0, 0.0, 10.0]),
            r"gnd\[1\].*bbx \[0.0, 0.0, 10.0\] is not a box",
        ),
        (lambda d: d["gnd"][1].update(bbx=[5.0, 0.0, 1.0, 9.0]), r"is not a box"),
        (lambda d: d["gnd"].pop(), r"'gnd' has 1 entries but qimlist names 2 queries"),
        (
            lambda d: d["imlist"].__setitem__(0, "../escape"),
            r"imlist\[0\] = '../escape' is not an image name",
        ),
        (lambda d: d["gnd"][0].update(junk=["a"]), r"'junk' must be a list of integer database indices"),
    ],
)
def test_revisitop_malformed_gnd(revisitop: Path, mutate, message: str) -> None:
    data = gnd_dict([dict(g) for g in GND])
    mutate(data)
    write_gnd(revisitop, data)
    with pytest.raises(DatasetError, match=message):
        load_dataset(f"revisitop:{revisitop}", split="test")


def test_revisitop_corrupt_or_foreign_pickle(revisitop: Path) -> None:
    (revisitop / "gnd_roxford5k.pkl").write_bytes(b"not a pickle at all")
    with pytest.raises(DatasetError, match="is not a readable revisitop gnd pickle"):
        load_dataset(f"revisitop:{revisitop}", split="train")
    write_gnd(revisitop, ["a", "list"])
    with pytest.raises(DatasetError, match="has no 'imlist'; a revisitop gnd file is a dict"):
        load_dataset(f"revisitop:{revisitop}", split="train")


def test_revisitop_gnd_file_choice(revisitop: Path) -> None:
    write_gnd(revisitop, gnd_dict(), name="rparis6k")
    with pytest.raises(DatasetError, match=r"several ground-truth files .*\?name=roxford5k"):
        load_dataset(f"revisitop:{revisitop}", split="train")
    assert load_dataset(f"revisitop:{revisitop}?name=rparis6k", split="test").extras["dataset"] == "rparis6k"
    with pytest.raises(DatasetError, match=r"name='roxford' needs .*gnd_roxford\.pkl.*roxford5k"):
        load_dataset(f"revisitop:{revisitop}?name=roxford", split="train")
    for f in revisitop.glob("gnd_*.pkl"):
        f.unlink()
    with pytest.raises(DatasetError, match=r"has no gnd_\*\.pkl file"):
        load_dataset(f"revisitop:{revisitop}", split="train")


def test_revisitop_missing_image_and_val(revisitop: Path) -> None:
    (revisitop / "jpg" / "db3.jpg").unlink()
    (revisitop / "jpg" / "db4.jpg").unlink()
    with pytest.raises(DatasetError, match=r"db3\.jpg is missing \(and 1 more\).*jpg/<name>\.jpg"):
        load_dataset(f"revisitop:{revisitop}", split="train")
    load_dataset(f"revisitop:{revisitop}", split="test")  # the queries are all there
    with pytest.raises(DatasetError, match=r"revisitop has no 'val' split"):
        load_dataset(f"revisitop:{revisitop}", split="val")
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(f"revisitop:{revisitop / 'nope'}", split="train")


# ---------------------------------------------------------------------------------------------- GLDv2
INDEX = ["abc0000000000001", "abd0000000000002", "bcd0000000000003", "f000000000000004"]
TEST = ["111000000000000a", "222000000000000b", "333000000000000c", "444000000000000d", "555000000000000e"]
SOLUTION = [
    ("222000000000000b", f"{INDEX[3]} {INDEX[1]}", "Private"),
    ("111000000000000a", INDEX[2], "Public"),
    ("333000000000000c", "None", "Private"),  # no positives: not a query
    ("444000000000000d", INDEX[0], "Ignored"),
    ("555000000000000e", f"{INDEX[0]} {INDEX[1]}", "Private"),
]


def image_path(root: Path, folder: str, image_id: str) -> Path:
    return root / folder / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"


def write_csv(path: Path, header: str, rows: list[tuple[str, ...]]) -> None:
    path.write_text("\n".join([header, *(",".join(r) for r in rows)]) + "\n")


@pytest.fixture
def gldv2(tmp_path: Path) -> Path:
    root = tmp_path / "gldv2"
    for i, image_id in enumerate(INDEX):
        jpeg(image_path(root, "index", image_id), i)
    for i, image_id in enumerate(TEST):
        jpeg(image_path(root, "test", image_id), i)
    write_csv(root / "index.csv", "id", [(i,) for i in INDEX])
    write_csv(root / "test.csv", "id", [(i,) for i in TEST])
    write_csv(root / "retrieval_solution_v2.1.csv", "id,images,Usage", SOLUTION)
    return root


def test_gldv2_splits_and_usage(gldv2: Path) -> None:
    index = load_dataset(f"gldv2:{gldv2}", split="train")
    assert [index.item_id(i) for i in range(len(index))][:2] == [
        "index/a/b/c/abc0000000000001.jpg",
        "index/a/b/d/abd0000000000002.jpg",
    ]
    assert len(index) == 4 and index.classes == ["gldv2"] and index.targets.tolist() == [0] * 4

    private = load_dataset(f"gldv2:{gldv2}", split="test")  # default usage=private, test.csv order
    assert [private.item_id(i) for i in range(len(private))] == [
        "test/2/2/2/222000000000000b.jpg",
        "test/5/5/5/555000000000000e.jpg",
    ]
    assert private.classes == index.classes
    assert private.extras["retrieval_gt"] == [
        {"easy": [1, 3], "hard": [], "junk": []},
        {"easy": [0, 1], "hard": [], "junk": []},
    ]
    public = load_dataset(f"gldv2:{gldv2}?usage=public", split="test")
    assert public.extras["retrieval_gt"] == [{"easy": [2], "hard": [], "junk": []}]
    both = load_dataset(f"gldv2:{gldv2}?usage=all", split="test")
    assert [both.item_id(i).split("/")[1] for i in range(len(both))] == ["1", "2", "5"]
    # The gallery does not depend on the query selection, so its cached features stay valid.
    assert load_dataset(f"gldv2:{gldv2}?usage=all", split="train").manifest_hash == index.manifest_hash


def test_gldv2_errors(gldv2: Path) -> None:
    with pytest.raises(DatasetError, match=r"usage='secret' is not one of private, public, all"):
        load_dataset(f"gldv2:{gldv2}?usage=secret", split="test")
    image_path(gldv2, "test", TEST[4]).unlink()
    with pytest.raises(DatasetError, match=r"555000000000000e\.jpg is missing; .*test/a/b/c/<id>\.jpg"):
        load_dataset(f"gldv2:{gldv2}", split="test")
    image_path(gldv2, "index", INDEX[2]).unlink()
    with pytest.raises(DatasetError, match=r"bcd0000000000003\.jpg is missing; .*index/a/b/c/<id>\.jpg"):
        load_dataset(f"gldv2:{gldv2}", split="train")

    write_csv(gldv2 / "test.csv", "id", [(i,) for i in TEST[1:]])
    with pytest.raises(DatasetError, match=r"data row 2: query '111000000000000a' is not in .*test\.csv"):
        load_dataset(f"gldv2:{gldv2}", split="test")
    write_csv(gldv2 / "test.csv", "id", [(i,) for i in TEST])
    write_csv(
        gldv2 / "retrieval_solution_v2.1.csv", "id,images,Usage", [(TEST[0], "ffff000000000000", "Private")]
    )
    with pytest.raises(DatasetError, match=r"relevant image 'ffff000000000000' .* is not in .*index\.csv"):
        load_dataset(f"gldv2:{gldv2}", split="test")
    with pytest.raises(DatasetError, match=r"no public query with a relevant index image; try usage=all"):
        load_dataset(f"gldv2:{gldv2}?usage=public", split="test")
    write_csv(gldv2 / "retrieval_solution_v2.1.csv", "id,images", [(TEST[0], INDEX[0])])
    with pytest.raises(DatasetError, match=r"has no 'Usage' column \(header: id, images\)"):
        load_dataset(f"gldv2:{gldv2}", split="test")
    write_csv(gldv2 / "retrieval_solution_v2.1.csv", "id,images,Usage", [(TEST[0], INDEX[0], "Private", "x")])
    with pytest.raises(DatasetError, match=r"data row 1 has 4 fields, not 3"):
        load_dataset(f"gldv2:{gldv2}", split="test")
    (gldv2 / "test.csv").write_bytes(b"id\n\xff\xfe\x00\n")
    with pytest.raises(DatasetError, match=r"test\.csv is not a UTF-8 CSV file"):
        load_dataset(f"gldv2:{gldv2}", split="test")
    write_csv(gldv2 / "index.csv", "id", [(INDEX[0],), ("../../etc",)])
    with pytest.raises(DatasetError, match=r"index\.csv data row 2: '../../etc' is not a GLDv2 image id"):
        load_dataset(f"gldv2:{gldv2}", split="train")
    write_csv(gldv2 / "index.csv", "id", [(INDEX[0],), (INDEX[0],)])
    with pytest.raises(DatasetError, match=r"lists image id 'abc0000000000001' twice"):
        load_dataset(f"gldv2:{gldv2}", split="train")
    (gldv2 / "index.csv").unlink()
    with pytest.raises(DatasetError, match=r"cannot read .*index\.csv"):
        load_dataset(f"gldv2:{gldv2}", split="train")


# ------------------------------------------------------------------------------------------- Copydays
ORIGINALS = ["200000.jpg", "200100.jpg", "200200.jpg"]
QUERY_FILES = {
    "strong": ["200001.jpg", "200002.jpg", "200201.jpg"],
    "jpegqual/3": ORIGINALS,
    "jpegqual/75": ORIGINALS[:1],
    "crops/10": ORIGINALS[1:],
}


@pytest.fixture
def copydays(tmp_path: Path) -> Path:
    root = tmp_path / "copydays"
    for i, name in enumerate(ORIGINALS):
        jpeg(root / "original" / name, i)
    for folder, names in QUERY_FILES.items():
        for i, name in enumerate(names):
            jpeg(root / folder / name, i)
    (root / "strong" / ".DS_Store").write_bytes(b"junk")  # ignored
    return root


def test_copydays_blocks_and_queries(copydays: Path) -> None:
    gallery = load_dataset(f"copydays:{copydays}", split="train")
    assert [gallery.item_id(i) for i in range(3)] == [f"original/{n}" for n in ORIGINALS]
    assert gallery.classes == ["2000", "2001", "2002"] and gallery.targets.tolist() == [0, 1, 2]
    assert gallery.extras == {"protocol": "copydays"}

    everything = load_dataset(f"copydays:{copydays}", split="test")
    assert len(everything) == 3 + 3 + 1 + 2 and everything.classes == gallery.classes
    ids = [everything.item_id(i) for i in range(len(everything))]
    assert ids[:4] == ["strong/200001.jpg", "strong/200002.jpg", "strong/200201.jpg", "jpegqual/3/200000.jpg"]
    assert everything.targets.tolist() == [0, 0, 2, 0, 1, 2, 0, 1, 2]

    strong = load_dataset(f"copydays:{copydays}?queries=strong", split="test")
    assert strong.targets.tolist() == [0, 0, 2]
    crops = load_dataset(f"copydays:{copydays}?queries=crops", split="test")
    assert [crops.item_id(i) for i in range(2)] == ["crops/10/200100.jpg", "crops/10/200200.jpg"]
    assert (
        load_dataset(f"copydays:{copydays}?queries=crops", split="train").manifest_hash
        == gallery.manifest_hash
    )


def test_copydays_errors(copydays: Path) -> None:
    with pytest.raises(DatasetError, match=r"queries='rotations' is not one of strong, jpegqual, crops, all"):
        load_dataset(f"copydays:{copydays}?queries=rotations", split="test")
    with pytest.raises(DatasetError, match=r"copydays has no 'val' split"):
        load_dataset(f"copydays:{copydays}", split="val")
    jpeg(copydays / "strong" / "999901.jpg")
    with pytest.raises(DatasetError, match=r"999901\.jpg has block id '9999', which no image in .*original"):
        load_dataset(f"copydays:{copydays}?queries=strong", split="test")
    for name in QUERY_FILES["crops/10"]:
        (copydays / "crops" / "10" / name).unlink()
    with pytest.raises(DatasetError, match=r"no images in .*crops; the Copydays layout"):
        load_dataset(f"copydays:{copydays}?queries=crops", split="test")
    for name in ORIGINALS:
        (copydays / "original" / name).unlink()
    with pytest.raises(DatasetError, match=r"no images in .*original"):
        load_dataset(f"copydays:{copydays}", split="train")
