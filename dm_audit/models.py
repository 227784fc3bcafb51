"""Networks that dm-audit trains, built by name through a registry (timm style).

Every model is an :class:`AuditModel`: ``forward(x)`` returns logits ``(B, C)`` and ``embed(x)``
returns the penultimate embedding ``(B, E)`` (``forward(x) == head(embed(x))``), which the
anomaly flags search with faiss.

Models take *prepared* float inputs: features ``(B, D)`` or images ``(B, C, H, W)``. The
conversion from the dataset's raw inputs (float32 features, uint8 ``NHWC`` images) happens in
the data pipeline (:func:`dm_audit.training.prepare_batch`), which standardises with the
statistics a model carries in its ``input_mean`` / ``input_std`` buffers, so that the
statistics travel inside every checkpoint and scoring uses exactly what training used.

Names: ``"mlp"`` (feature tables), ``"resnet20"``, ``"resnet32"``, ``"resnet44"``,
``"resnet56"`` (CIFAR ResNets of He et al. 2016, 16-32-64 channels), ``"resnet18"``,
``"resnet50"`` (torchvision architectures; pretrained weights only from a local state-dict
file, never downloaded) and ``"auto"``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dm_audit.errors import ConfigError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MLP",
    "AuditModel",
    "CifarResNet",
    "TorchvisionResNet",
    "create_model",
    "list_models",
    "register_model",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ModelFactory = Callable[..., "AuditModel"]
_REGISTRY: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Register a model factory under ``name`` (decorator).

    The factory is called as ``factory(num_classes=..., input_shape=..., **options)`` and returns
    an :class:`AuditModel`.
    """

    def decorator(factory: ModelFactory) -> ModelFactory:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorator


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`, ``"auto"`` included, sorted."""
    return sorted([*_REGISTRY, "auto"])


class AuditModel(nn.Module):
    """Base class: ``forward(x) = head(embed(x))``, plus the input statistics.

    Parameters
    ----------
    input_kind : {"features", "image"}
        What the model consumes.
    input_shape : tuple of int
        Shape of one raw input as the dataset stores it: ``(D,)`` for features, ``(H, W, C)`` for
        images.

    Attributes
    ----------
    embedding_dim : int
        Width ``E`` of :meth:`embed`'s output.
    head : nn.Linear
        The classifier on top of the embedding.
    model_name : str
        Registry name the model was built under (set by :func:`create_model`).
    model_options : dict
        The architecture options it was built with (set by :func:`create_model`), so that a
        stored model can be rebuilt before its weights are loaded.
    input_mean, input_std : torch.Tensor
        Buffers of shape ``(D,)`` (features) or ``(C,)`` (image channels, on the [0, 1] scale)
        used by the data pipeline to standardise inputs.
    """

    embedding_dim: int
    head: nn.Linear
    model_name: str = ""
    model_options: dict[str, object]

    def __init__(self, input_kind: str, input_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.input_kind = input_kind
        self.input_shape = tuple(int(s) for s in input_shape)
        self.model_options = {}
        width = self.input_shape[0] if input_kind == "features" else self.input_shape[-1]
        self.register_buffer("input_mean", torch.zeros(width))
        self.register_buffer("input_std", torch.ones(width))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate embedding ``(B, E)`` of prepared inputs ``x``."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` of prepared inputs ``x``."""
        return self.head(self.embed(x))

    def set_input_stats(self, mean: Sequence[float] | torch.Tensor, std: Sequence[float]) -> None:
        """Set the standardisation statistics, shape ``(D,)`` or ``(C,)``."""
        mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(self.input_mean.shape)
        std_t = torch.as_tensor(std, dtype=torch.float32).reshape(self.input_std.shape)
        if not torch.all(std_t > 0):
            raise ValueError("input_std must be positive")
        self.input_mean.copy_(mean_t)
        self.input_std.copy_(std_t)


# --------------------------------------------------------------------------------------------
# MLP for feature tables


class MLP(AuditModel):
    """Multi-layer perceptron: ``[Linear -> (BatchNorm) -> ReLU -> (Dropout)] * L -> Linear``.

    Parameters
    ----------
    in_features : int
        Input width ``D``.
    num_classes : int
        Output width ``C``.
    hidden : sequence of int
        Hidden widths; the last one is the embedding width ``E``.
    batchnorm : bool
        BatchNorm after each hidden Linear (makes the net insensitive to feature scale).
    dropout : float
        Dropout probability after each hidden activation.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: Sequence[int] = (256, 256),
        *,
        batchnorm: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__("features", (in_features,))
        if not hidden:
            raise ConfigError("mlp needs at least one hidden layer")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"mlp dropout must be in [0, 1), got {dropout}")
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            if int(h) < 1:
                raise ConfigError(f"mlp hidden widths must be positive, got {list(hidden)}")
            # No bias before BatchNorm: BN's shift makes it redundant.
            layers.append(nn.Linear(width, int(h), bias=not batchnorm))
            if batchnorm:
                layers.append(nn.BatchNorm1d(int(h)))
            layers.append(nn.ReLU(inplace=True))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = int(h)
        self.body = nn.Sequential(*layers)
        self.embedding_dim = width
        self.head = nn.Linear(width, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Last hidden activation ``(B, hidden[-1])`` of features ``x`` ``(B, D)``."""
        return self.body(x)


@register_model("mlp")
def _mlp(
    *,
    num_classes: int,
    input_shape: tuple[int, ...],
    hidden: Sequence[int] = (256, 256),
    batchnorm: bool = True,
    dropout: float = 0.0,
) -> MLP:
    if len(input_shape) != 1:
        raise ConfigError(f"mlp takes feature vectors of shape (D,), got input shape {input_shape}")
    return MLP(input_shape[0], num_classes, hidden, batchnorm=batchnorm, dropout=dropout)


# --------------------------------------------------------------------------------------------
# CIFAR ResNets (He et al. 2016, section 4.2): 6n+2 layers, 16-32-64 channels


class _BasicBlock(nn.Module):
    """Two 3x3 convolutions with a shortcut; option "A" pads channels, "B" projects."""

    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut_kind = shortcut
        self.pad = 0
        self.stride = stride
        self.projection: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            if shortcut == "A":
                # Parameter-free: subsample spatially, zero-pad the new channels.
                self.pad = planes - in_planes
            else:
                self.projection = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                    nn.BatchNorm2d(planes),
                )

    def _shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.projection is not None:
            return self.projection(x)
        if self.stride != 1 or self.pad:
            x = x[:, :, :: self.stride, :: self.stride]
            half = self.pad // 2
            x = F.pad(x, (0, 0, 0, 0, half, self.pad - half))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self._shortcut(x))


class CifarResNet(AuditModel):
    """ResNet for small images: depth ``6n + 2``, stages of 16, 32, 64 channels.

    Parameters
    ----------
    depth : int
        20, 32, 44, 56, ... (``(depth - 2) % 6 == 0``).
    num_classes : int
        Output width ``C``.
    input_shape : tuple of int
        ``(H, W, channels)`` of a raw image.
    shortcut : {"A", "B"}
        "A": identity shortcuts with zero-padding (the paper's CIFAR choice, no extra
        parameters); "B": 1x1 projection shortcuts where the shape changes.
    """

    def __init__(
        self, depth: int, num_classes: int, input_shape: tuple[int, ...], shortcut: str = "A"
    ) -> None:
        super().__init__("image", input_shape)
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ConfigError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56), got {depth}")
        if shortcut not in ("A", "B"):
            raise ConfigError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        n = (depth - 2) // 6
        channels = input_shape[-1]
        self.conv1 = nn.Conv2d(channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages: list[nn.Module] = []
        in_planes = 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(_BasicBlock(in_planes, planes, stride if i == 0 else 1, shortcut))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.embedding_dim = 64
        self.head = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Global-average-pooled last stage ``(B, 64)`` of images ``x`` ``(B, C, H, W)``."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.stages(out)
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)


def _cifar_factory(depth: int) -> ModelFactory:
    def factory(
        *, num_classes: int, input_shape: tuple[int, ...], shortcut: str = "A"
    ) -> CifarResNet:
        _check_image_shape(f"resnet{depth}", input_shape)
        return CifarResNet(depth, num_classes, input_shape, shortcut)

    return factory


for _depth in (20, 32, 44, 56):
    register_model(f"resnet{_depth}")(_cifar_factory(_depth))


# --------------------------------------------------------------------------------------------
# torchvision ResNets


class TorchvisionResNet(AuditModel):
    """A torchvision ResNet whose ``fc`` is the head and whose pooled features are the embedding.

    Parameters
    ----------
    arch : {"resnet18", "resnet50"}
        torchvision architecture.
    num_classes : int
        Output width ``C``.
    input_shape : tuple of int
        ``(H, W, channels)`` of a raw image. A channel count other than 3 replaces the stem
        convolution (pretrained stem weights are summed over RGB and spread over the channels).
    weights_path : path, optional
        Local ``state_dict`` file, loaded with ``weights_only=True``: torchvision's ImageNet
        weights saved with ``torch.save(model.state_dict())`` (a ``module.`` prefix is
        stripped), or a dm-audit model's own state dict. Nothing is ever downloaded. A
        classifier of another size is left freshly initialised. The input statistics become
        the file's own when it has them, else ImageNet's, which pretrained weights expect.
    """

    def __init__(
        self,
        arch: str,
        num_classes: int,
        input_shape: tuple[int, ...],
        weights_path: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__("image", input_shape)
        import torchvision

        builder = {"resnet18": torchvision.models.resnet18, "resnet50": torchvision.models.resnet50}
        # weights=None: torchvision must never reach the network.
        net = builder[arch](weights=None)
        channels = input_shape[-1]
        if weights_path is not None:
            state = _load_state_dict(weights_path)
            stats = state.pop("input_mean", None), state.pop("input_std", None)
            w = state.get("conv1.weight")
            if w is not None and w.shape[1] != channels:
                # Spread the summed filters over the new channels (grayscale: their sum).
                state["conv1.weight"] = w.sum(dim=1, keepdim=True).repeat(1, channels, 1, 1) / (
                    channels
                )
            fc_shape = tuple(state["fc.weight"].shape) if "fc.weight" in state else None
            if fc_shape != (num_classes, net.fc.in_features):
                state.pop("fc.weight", None)
                state.pop("fc.bias", None)
        if channels != 3:
            net.conv1 = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.embedding_dim = net.fc.in_features
        net.fc = nn.Linear(self.embedding_dim, num_classes)
        if weights_path is not None:
            try:
                missing, unexpected = net.load_state_dict(state, strict=False)
            except RuntimeError as exc:  # tensors of the wrong shape
                raise ConfigError(
                    f"weights file {weights_path} does not fit {arch}: {str(exc)[:300]}"
                ) from exc
            allowed_missing = {"fc.weight", "fc.bias"}
            if unexpected or set(missing) - allowed_missing:
                raise ConfigError(
                    f"weights file {weights_path} does not fit {arch}: "
                    f"missing {sorted(set(missing) - allowed_missing)[:5]}, "
                    f"unexpected {sorted(unexpected)[:5]}"
                )
            mean, std = stats
            if mean is not None and std is not None and mean.numel() == channels:
                self.set_input_stats(mean, std)  # the statistics that model was trained with
            else:
                self.set_input_stats(
                    _channel_stats(IMAGENET_MEAN, channels), _channel_stats(IMAGENET_STD, channels)
                )
        self.head = net.fc
        net.fc = nn.Identity()
        self.body = net

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(B, 512)`` (resnet18) or ``(B, 2048)`` (resnet50)."""
        return self.body(x)


def _channel_stats(values: Sequence[float], channels: int) -> list[float]:
    if channels == 3:
        return list(values)
    return [sum(values) / 3.0] * channels


def _load_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"weights file {p} does not exist")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # the message names the file; the cause is chained
        raise ConfigError(f"cannot read weights file {p} as a state dict: {exc}") from exc
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"weights file {p} is not a state dict of tensors")
    # DataParallel / DistributedDataParallel checkpoints prefix every key.
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    # A dm-audit model (this class, e.g. a training checkpoint's "model"): body.* + head.*.
    if any(k.startswith("body.") for k in state):
        state = {
            ("fc." + k[5:] if k.startswith("head.") else k[5:] if k.startswith("body.") else k): v
            for k, v in state.items()
        }
    return dict(state)


def _torchvision_factory(arch: str) -> ModelFactory:
    def factory(
        *,
        num_classes: int,
        input_shape: tuple[int, ...],
        weights_path: str | os.PathLike[str] | None = None,
    ) -> TorchvisionResNet:
        _check_image_shape(arch, input_shape)
        return TorchvisionResNet(arch, num_classes, input_shape, weights_path)

    return factory


for _arch in ("resnet18", "resnet50"):
    register_model(_arch)(_torchvision_factory(_arch))


def _check_image_shape(name: str, input_shape: tuple[int, ...]) -> None:
    if len(input_shape) != 3:
        raise ConfigError(f"{name} takes images of shape (H, W, C), got input shape {input_shape}")


# --------------------------------------------------------------------------------------------
# factory


def _auto_name(input_shape: tuple[int, ...]) -> str:
    if len(input_shape) == 1:
        return "mlp"
    if len(input_shape) == 3:
        return "resnet20" if max(input_shape[0], input_shape[1]) <= 64 else "resnet18"
    raise ConfigError(
        f"cannot choose a model for input shape {input_shape}: expected (D,) or (H, W, C)"
    )


def create_model(
    name: str,
    *,
    num_classes: int,
    input_shape: Sequence[int],
    weights_path: str | os.PathLike[str] | None = None,
    **options: object,
) -> AuditModel:
    """Build a model by name.

    Parameters
    ----------
    name : str
        One of :func:`list_models`. ``"auto"``: ``"mlp"`` for features, ``"resnet20"`` for
        images up to 64 px, ``"resnet18"`` for larger images.
    num_classes : int
        Number of classes ``C`` (logit width).
    input_shape : sequence of int
        Shape of one raw input: ``(D,)`` for features, ``(H, W, C)`` for images (the dataset's
        ``NHWC`` layout without ``N``).
    weights_path : path, optional
        Local state-dict file with pretrained weights (``resnet18`` / ``resnet50`` only).
    **options
        Architecture options: ``hidden``, ``batchnorm``, ``dropout`` (mlp); ``shortcut``
        (CIFAR ResNets).

    Returns
    -------
    AuditModel
        ``forward(x) -> (B, C)`` logits, ``embed(x) -> (B, E)``.

    Raises
    ------
    ConfigError
        Unknown name, bad option, or a shape the architecture cannot take.
    """
    shape = tuple(int(s) for s in input_shape)
    if num_classes < 2:
        raise ConfigError(f"num_classes must be at least 2, got {num_classes}")
    key = _auto_name(shape) if name == "auto" else name
    if key not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}; choose one of {list_models()}")
    kwargs = dict(options)
    if weights_path is not None:
        if key not in ("resnet18", "resnet50"):
            raise ConfigError(f"model {key!r} takes no pretrained weights file")
        kwargs["weights_path"] = weights_path
    try:
        model = _REGISTRY[key](num_classes=num_classes, input_shape=shape, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad options for model {key!r}: {exc}") from exc
    model.model_name = key
    model.model_options = dict(options)
    return model


MODEL_FILE_VERSION = 1


def save_model(
    model: AuditModel,
    path: str | os.PathLike[str],
    *,
    num_classes: int,
    classes: Sequence[str],
    model_params: dict[str, Any] | None = None,
) -> Path:
    """Save a trained model as a state dict plus what `load_model` needs to rebuild it.

    Only tensors and plain values are stored, so the file loads with ``weights_only=True`` (no
    pickled code runs when a model file is opened). Written atomically.

    Parameters
    ----------
    model : AuditModel
        A model from `create_model` (any device; saved on CPU).
    path : path-like
        Output file (``.pt``).
    num_classes : int
    classes : sequence of str, length C
        Class names in code order.
    model_params : dict, optional
        The architecture options the model was created with.
    """
    from dm_audit.atomic import atomic_write

    payload = {
        "format_version": MODEL_FILE_VERSION,
        "model": model.model_name,
        "num_classes": int(num_classes),
        "input_shape": list(model.input_shape),
        "model_params": dict(model_params or {}),
        "classes": [str(c) for c in classes],
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    return atomic_write(Path(path), lambda f: torch.save(payload, f))


def load_model(path: str | os.PathLike[str]) -> tuple[AuditModel, list[str]]:
    """Load a model saved by `save_model`.

    Returns
    -------
    (AuditModel, list of str)
        The model in eval mode on the CPU, and the class names in code order.
    """
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"model file {file} does not exist")
    try:
        payload = torch.load(file, weights_only=True, map_location="cpu")
    except Exception as error:  # a truncated or foreign file: say which
        raise ConfigError(f"{file} is not a dm-audit model file: {error}") from None
    if not isinstance(payload, dict) or payload.get("format_version") != MODEL_FILE_VERSION:
        raise ConfigError(f"{file} is not a dm-audit model file (format version mismatch)")
    model = create_model(
        payload["model"],
        num_classes=payload["num_classes"],
        input_shape=tuple(payload["input_shape"]),
        **payload["model_params"],
    )
    model.load_state_dict(payload["state_dict"])
    return model.eval(), list(payload["classes"])
