import pytest
import torch
import torchvision

from oaml.errors import ConfigError, ShapeError
from oaml.models.adapter import ClassifierProtocol
from oaml.models.resnet import create_model, load_weights


def test_cifar_resnet18_interface():
    m = create_model("resnet18", num_classes=10, in_channels=1, width=0.25).eval()
    x = torch.randn(3, 1, 28, 28)
    logits, feats = m.forward_features(x)
    assert isinstance(m, ClassifierProtocol)
    assert logits.shape == (3, 10) and feats.shape == (3, m.feature_dim) == (3, 128)
    assert torch.allclose(m(x), logits) and torch.allclose(m.head(feats), logits)
    assert (feats >= 0).all()  # post-ReLU pooled
    maps = m.feature_maps(x)
    assert [t.shape[1] for t in maps] == [16, 16, 32, 64, 128]
    W, b = m.fc_weights()
    assert torch.allclose(feats @ W.T + b, logits, atol=1e-5)
    maps1, logits1 = m.maps_and_logits(x)  # one pass: the same maps and logits as the two calls
    assert all(torch.equal(a, b) for a, b in zip(maps1, maps)) and len(maps1) == len(maps)
    assert torch.equal(logits1, m(x))


def test_imagenet_layout_loads_torchvision_weights(tmp_path):
    ref = torchvision.models.resnet18(num_classes=7)
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    m = load_weights(create_model("resnet18", num_classes=7, stem="imagenet"), tmp_path / "w.pth").eval()
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(m(x), ref.eval()(x), atol=1e-5)


def test_wrong_checkpoint_is_a_clear_error(tmp_path):
    torch.save(create_model("resnet18", num_classes=10, width=0.25).state_dict(), tmp_path / "w.pth")
    with pytest.raises(ShapeError, match="class count"):
        load_weights(create_model("resnet18", num_classes=100, width=0.25), tmp_path / "w.pth")


def test_bad_hyperparameters():
    with pytest.raises(ConfigError, match="Did you mean resnet18"):
        create_model("resnet81", num_classes=10)
    with pytest.raises(ConfigError, match="in_channels"):
        create_model("resnet18", num_classes=10, in_channels=2)


def test_resolve_device_gives_cuda_an_index(monkeypatch):
    """torch.cuda.set_device needs an index: "cuda" means this process's GPU (LOCAL_RANK)."""
    import torch

    from oaml.utils.device import resolve_device

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device(torch.device("cuda")) == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("cuda") == torch.device("cuda", 3)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")
