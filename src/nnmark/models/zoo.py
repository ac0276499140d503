"""The network zoo: CNN (Zhang / Deeba), MLP (Wang), LeNet-5 and a small VGG."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from nnmark.errors import ModelFileError

# Preset defaults; a spec may override any key.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    # Deeba Table II / Zhang Table 6 (MNIST): conv32-32-pool-64-64-pool-dense256-256.
    "cnn": {"channels": [32, 32, 64, 64], "dense": [256, 256], "dropout": 0.5},
    # Zhang Table 6 MNIST variant with dense 200/200.
    "cnn-200": {"channels": [32, 32, 64, 64], "dense": [200, 200], "dropout": 0.5},
    # Zhang Table 6 CIFAR-10 variant.
    "cnn-cifar": {"channels": [64, 64, 128, 128], "dense": [256, 256], "dropout": 0.5},
    # Wang et al.: MLP 784-64-10.
    "mlp": {"hidden": [64], "dropout": 0.0},
    "lenet5": {},
    # A small VGG-style net: conv blocks with batch norm.
    "vgg-small": {"blocks": [[32, 32], [64, 64], [128, 128]], "dense": [256], "dropout": 0.5},
}


def model_spec(arch: str, in_shape: tuple[int, int, int] | list[int], num_classes: int,
               **overrides: Any) -> dict[str, Any]:
    """A complete spec for preset ``arch`` on inputs of ``in_shape`` = (C, H, W)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    spec = {"arch": arch, "in_shape": [int(v) for v in in_shape], "num_classes": int(num_classes)}
    spec.update(copy.deepcopy(ARCHITECTURES[arch]))
    spec.update(overrides)
    return spec


def validate_spec(spec: Any) -> dict[str, Any]:
    """Check a spec read from an (untrusted) file; return a complete copy."""
    if not isinstance(spec, dict):
        raise ModelFileError("architecture spec must be a JSON object")
    arch = spec.get("arch")
    if arch not in ARCHITECTURES:
        raise ModelFileError(f"unknown architecture {arch!r} in spec")
    shape = spec.get("in_shape")
    if (not isinstance(shape, list) or len(shape) != 3
            or not all(isinstance(v, int) and 0 < v <= 1024 for v in shape)):
        raise ModelFileError("spec in_shape must be [C, H, W] with positive ints")
    nc = spec.get("num_classes")
    if not isinstance(nc, int) or not 1 < nc <= 100_000:
        raise ModelFileError("spec num_classes must be an int > 1")
    full = model_spec(arch, shape, nc)
    for k, v in spec.items():
        full[k] = v
    return full


def _conv(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, padding=1)


class CNN(nn.Module):
    """conv(c1)-conv(c2)-pool-conv(c3)-conv(c4)-pool-dense(d1)-dense(d2)-head.

    Layers: ``conv1``..``conv4`` (3x3, padding 1, ReLU), ``fc1``, ``fc2`` (ReLU,
    dropout), ``head`` (logits). Input ``(N, C, H, W)``, output ``(N, classes)``.
    """

    def __init__(self, in_shape, num_classes, channels, dense, dropout):
        super().__init__()
        c, h, w = in_shape
        c1, c2, c3, c4 = channels
        self.conv1, self.conv2 = _conv(c, c1), _conv(c1, c2)
        self.conv3, self.conv4 = _conv(c2, c3), _conv(c3, c4)
        self.pool = nn.MaxPool2d(2)
        self.drop = nn.Dropout(dropout)
        flat = c4 * (h // 4) * (w // 4)
        self.fc1 = nn.Linear(flat, dense[0])
        self.fc2 = nn.Linear(dense[0], dense[1])
        self.head = nn.Linear(dense[1], num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv2(torch.relu(self.conv1(x)))))
        x = self.pool(torch.relu(self.conv4(torch.relu(self.conv3(x)))))
        x = self.drop(torch.relu(self.fc1(x.flatten(1))))
        return self.drop(torch.relu(self.fc2(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class MLP(nn.Module):
    """Flatten, hidden ReLU layers ``fc1``..``fcK``, then ``head``. MLP 784-64-10 is
    ``hidden=[64]`` on 28x28 inputs; ``head.weight`` holds the 640 hidden-to-output
    weights Wang et al. mark."""

    def __init__(self, in_shape, num_classes, hidden, dropout):
        super().__init__()
        width = int(in_shape[0] * in_shape[1] * in_shape[2])
        self.drop = nn.Dropout(dropout)
        for i, hdim in enumerate(hidden, start=1):
            setattr(self, f"fc{i}", nn.Linear(width, hdim))
            width = hdim
        self.n_hidden = len(hidden)
        self.head = nn.Linear(width, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for i in range(1, self.n_hidden + 1):
            x = self.drop(torch.relu(getattr(self, f"fc{i}")(x)))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class LeNet5(nn.Module):
    """LeNet-5: conv1 6@5x5 - pool - conv2 16@5x5 - pool - fc1 120 - fc2 84 - head.
    Small inputs (< 28 px) use padding 2 in both convs so 8x8 digits fit."""

    def __init__(self, in_shape, num_classes):
        super().__init__()
        c, h, w = in_shape
        pad2 = 2 if min(h, w) < 28 else 0
        self.conv1 = nn.Conv2d(c, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5, padding=pad2)
        self.pool = nn.MaxPool2d(2)
        with torch.no_grad():
            flat = self._conv_part(torch.zeros(1, c, h, w)).numel()
        self.fc1 = nn.Linear(flat, 120)
        self.fc2 = nn.Linear(120, 84)
        self.head = nn.Linear(84, num_classes)

    def _conv_part(self, x):
        x = self.pool(torch.relu(self.conv1(x)))
        return self.pool(torch.relu(self.conv2(x)))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._conv_part(x).flatten(1)
        return torch.relu(self.fc2(torch.relu(self.fc1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class VGGSmall(nn.Module):
    """VGG-style: blocks of 3x3 conv + batch norm + ReLU, a 2x2 max-pool after each
    block (skipped once the map is 1 px), dense layers, ``head``. Convs are named
    ``conv1``, ``conv2``, ... in order."""

    def __init__(self, in_shape, num_classes, blocks, dense, dropout):
        super().__init__()
        c, h, w = in_shape
        layers: list[nn.Module] = []
        idx = 0
        for block in blocks:
            for cout in block:
                idx += 1
                conv = _conv(c, cout)
                setattr(self, f"conv{idx}", conv)
                layers += [conv, nn.BatchNorm2d(cout), nn.ReLU()]
                c = cout
            if min(h, w) >= 2:
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
        self.body = nn.Sequential(*layers)
        width = c * h * w
        fcs: list[nn.Module] = []
        for i, d in enumerate(dense, start=1):
            fc = nn.Linear(width, d)
            setattr(self, f"fc{i}", fc)
            fcs += [fc, nn.ReLU(), nn.Dropout(dropout)]
            width = d
        self.mlp = nn.Sequential(*fcs)
        self.head = nn.Linear(width, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.body(x).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_model(spec: dict[str, Any]) -> nn.Module:
    """Instantiate the network described by ``spec`` (random initial weights;
    seed torch beforehand, or use :func:`nnmark.train.seeded_model`)."""
    arch = spec["arch"]
    shape, nc = spec["in_shape"], spec["num_classes"]
    try:
        if arch in ("cnn", "cnn-200", "cnn-cifar"):
            model: nn.Module = CNN(shape, nc, spec["channels"], spec["dense"], spec["dropout"])
        elif arch == "mlp":
            model = MLP(shape, nc, spec["hidden"], spec["dropout"])
        elif arch == "lenet5":
            model = LeNet5(shape, nc)
        elif arch == "vgg-small":
            model = VGGSmall(shape, nc, spec["blocks"], spec["dense"], spec["dropout"])
        else:
            raise ModelFileError(f"unknown architecture {arch!r}")
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ModelFileError(f"invalid spec for {arch!r}: {exc}") from None
    model.spec = dict(spec)  # type: ignore[assignment]
    return model


def head_of(model: nn.Module) -> nn.Linear:
    """The final linear layer (``model.head``)."""
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Linear):
        raise ValueError("model has no linear `head` layer")
    return head
