"""Model factory: every architecture's logits and embedding shapes, options, local weights."""

from __future__ import annotations

import pytest
import torch
import torchvision

from dm_audit.errors import ConfigError
from dm_audit.models import (
    IMAGENET_MEAN,
    MLP,
    CifarResNet,
    TorchvisionResNet,
    create_model,
    list_models,
)


def _batch(shape: tuple[int, ...], n: int = 2) -> torch.Tensor:
    torch.manual_seed(0)
    if len(shape) == 1:
        return torch.randn(n, *shape)
    h, w, c = shape
    return torch.randn(n, c, h, w)


@pytest.mark.parametrize(
    ("name", "shape", "cls", "emb_dim"),
    [
        ("mlp", (64,), MLP, 256),
        ("resnet20", (16, 16, 3), CifarResNet, 64),
        ("resnet32", (8, 8, 1), CifarResNet, 64),
        ("resnet44", (8, 8, 3), CifarResNet, 64),
        ("resnet56", (8, 8, 3), CifarResNet, 64),
        ("resnet18", (32, 32, 3), TorchvisionResNet, 512),
        ("resnet50", (32, 32, 1), TorchvisionResNet, 2048),
    ],
)
def test_logits_and_embedding_shapes(name, shape, cls, emb_dim):
    model = create_model(name, num_classes=7, input_shape=shape).eval()
    assert isinstance(model, cls) and model.model_name == name
    x = _batch(shape, n=3)
    with torch.no_grad():
        logits, emb = model(x), model.embed(x)
    assert logits.shape == (3, 7) and emb.shape == (3, emb_dim) == (3, model.embedding_dim)
    torch.testing.assert_close(model.head(emb), logits)
    channels = shape[0] if len(shape) == 1 else shape[-1]
    assert model.input_mean.shape == model.input_std.shape == (channels,)


def test_cifar_resnet_sizes_match_the_paper():
    # He et al. 2016, Table 6: 0.27M / 0.46M / 0.66M / 0.85M parameters (option A, 10 classes).
    def count(name: str, **options) -> int:
        model = create_model(name, num_classes=10, input_shape=(32, 32, 3), **options)
        return sum(p.numel() for p in model.parameters())

    assert count("resnet20") == 269_722
    assert count("resnet32") == 464_154
    assert count("resnet44") == 658_586
    assert count("resnet56") == 853_018
    assert count("resnet20", shortcut="B") > count("resnet20")  # projection shortcuts add weights


def test_auto_picks_by_input():
    assert create_model("auto", num_classes=3, input_shape=(5,)).model_name == "mlp"
    assert create_model("auto", num_classes=3, input_shape=(28, 28, 1)).model_name == "resnet20"
    assert create_model("auto", num_classes=3, input_shape=(96, 96, 3)).model_name == "resnet18"
    assert "auto" in list_models() and "resnet56" in list_models()


def test_mlp_options():
    model = create_model(
        "mlp", num_classes=4, input_shape=(10,), hidden=(32, 16), batchnorm=False, dropout=0.2
    )
    assert model.embedding_dim == 16
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in model.modules())
    assert sum(isinstance(m, torch.nn.Dropout) for m in model.modules()) == 2


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("vgg16", {}, "unknown model"),
        ("mlp", {"input_shape": (8, 8, 3)}, "mlp takes feature vectors"),
        ("resnet20", {"input_shape": (64,)}, "takes images"),
        ("resnet20", {"shortcut": "C"}, "shortcut"),
        ("mlp", {"dropout": 1.5}, "dropout"),
        ("mlp", {"width": 3}, "bad options"),
        ("mlp", {"num_classes": 1}, "num_classes"),
        ("mlp", {"weights_path": "w.pt"}, "no pretrained weights"),
    ],
)
def test_bad_requests_raise_config_error(name, kwargs, message):
    args = {"num_classes": 3, "input_shape": (16, 16, 3) if name != "mlp" else (4,)}
    args.update(kwargs)
    with pytest.raises(ConfigError, match=message):
        create_model(name, **args)


def test_weights_come_only_from_a_local_state_dict(tmp_path):
    torch.manual_seed(1)
    source = torchvision.models.resnet18(weights=None, num_classes=1000)
    path = tmp_path / "resnet18.pt"
    torch.save(source.state_dict(), path)

    model = create_model("resnet18", num_classes=5, input_shape=(32, 32, 3), weights_path=path)
    torch.testing.assert_close(model.body.conv1.weight, source.conv1.weight)
    torch.testing.assert_close(
        model.body.layer4[1].bn2.running_var, source.layer4[1].bn2.running_var
    )
    assert model.head.out_features == 5  # the 1000-class classifier is not reused
    torch.testing.assert_close(model.input_mean, torch.tensor(IMAGENET_MEAN))

    # A grayscale stem sums the RGB filters.
    gray = create_model("resnet18", num_classes=5, input_shape=(32, 32, 1), weights_path=path)
    torch.testing.assert_close(gray.body.conv1.weight, source.conv1.weight.sum(1, keepdim=True))

    # Same number of classes: the classifier is kept too.
    same = create_model("resnet18", num_classes=1000, input_shape=(32, 32, 3), weights_path=path)
    torch.testing.assert_close(same.head.weight, source.fc.weight)

    # A dm-audit model's own state dict (body.* / head.* and its input statistics) loads too.
    model.set_input_stats([0.1, 0.2, 0.3], [0.5, 0.5, 0.5])
    own = tmp_path / "own.pt"
    torch.save(model.state_dict(), own)
    again = create_model("resnet18", num_classes=5, input_shape=(32, 32, 3), weights_path=own)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(again.state_dict()[key], value)

    with pytest.raises(ConfigError, match="does not exist"):
        create_model(
            "resnet18", num_classes=5, input_shape=(32, 32, 3), weights_path=tmp_path / "x"
        )
    wrong = tmp_path / "resnet50.pt"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), wrong)
    with pytest.raises(ConfigError, match="does not fit resnet18"):
        create_model("resnet18", num_classes=5, input_shape=(32, 32, 3), weights_path=wrong)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read weights file"):
        create_model("resnet18", num_classes=5, input_shape=(32, 32, 3), weights_path=junk)
