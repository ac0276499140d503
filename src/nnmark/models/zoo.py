"""The network zoo: CNN (Zhang / Deeba), MLP (Wang), LeNet-5 and a small VGG.

Specs read from files are untrusted: :func:`validate_spec` checks every field's
type and range against :class:`SpecLimits` and computes the network's size
(:func:`spec_size`: state-dict values and activation values per input) from the
spec alone, so an absurd spec is refused before anything is allocated;
:func:`expected_state` lists the tensors (names, shapes, dtypes) the network
holds by building it on PyTorch's ``meta`` device, which allocates no storage.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
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
_CNNS = ("cnn", "cnn-200", "cnn-cifar")


@dataclass(frozen=True)
class SpecLimits:
    """Bounds on an architecture spec read from an untrusted file (all inclusive).

    ``max_params``: state-dict values (weights, biases and batch-norm buffers) of the
    whole network, default 100,000,000 (400 MB as float32; the zoo's models have
    0.04-3.5 M). ``max_activations``: values the conv, pool and dense layers
    produce for ONE input, default 16,000,000 (64 MB as float32; a CNN on
    3x224x224 inputs needs 4.8 M). ``max_width``: units of a dense layer or
    channels of a conv, default 65,536. ``max_layers``: conv + dense layers
    including the head, default 64. ``max_side``: input height and width, default
    1,024. ``max_channels``: input channels, default 64. ``max_classes``: default 100,000.

    A trusted caller that needs more passes its own limits to
    :func:`nnmark.io.load_model` (``limits=SpecLimits(max_params=...)``).
    """

    max_params: int = 100_000_000
    max_activations: int = 16_000_000
    max_width: int = 65_536
    max_layers: int = 64
    max_side: int = 1024
    max_channels: int = 64
    max_classes: int = 100_000


DEFAULT_LIMITS = SpecLimits()
# Keys a spec may carry besides the architecture's own, if their value is a short scalar
# (e.g. "task": "classification", read by nnmark.tasks); they do not change the network.
_MAX_EXTRA_TEXT = 256


def model_spec(arch: str, in_shape: tuple[int, int, int] | list[int], num_classes: int,
               **overrides: Any) -> dict[str, Any]:
    """A complete spec for preset ``arch`` on inputs of ``in_shape`` = (C, H, W)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    spec = {"arch": arch, "in_shape": [int(v) for v in in_shape], "num_classes": int(num_classes)}
    spec.update(copy.deepcopy(ARCHITECTURES[arch]))
    spec.update(overrides)
    return spec


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int_list(spec: dict[str, Any], name: str, lo: int, hi: int, *, length: int | None = None,
              min_len: int = 0, max_len: int) -> list[int]:
    """``spec[name]`` as a list of ints in [lo, hi]; its length is checked before its items."""
    v = spec.get(name)
    if not isinstance(v, list):
        raise ModelFileError(f"spec {name} must be a list of ints")
    if length is not None and len(v) != length:
        raise ModelFileError(f"spec {name} must have {length} entries, has {len(v)}")
    if not min_len <= len(v) <= max_len:
        raise ModelFileError(f"spec {name} has {len(v)} entries; at most {max_len} are allowed")
    if not all(_is_int(x) and lo <= x <= hi for x in v):
        raise ModelFileError(f"spec {name} entries must be ints in [{lo}, {hi}]")
    return list(v)


def _dropout(spec: dict[str, Any]) -> float:
    p = spec.get("dropout")
    if not (isinstance(p, (int, float)) and not isinstance(p, bool) and math.isfinite(p) and 0 <= p < 1):
        raise ModelFileError("spec dropout must be a number in [0, 1)")
    return float(p)


def validate_spec(spec: Any, limits: SpecLimits | None = None) -> dict[str, Any]:
    """Check a spec read from an (untrusted) file; return a complete copy.

    Every field is type- and range-checked against ``limits`` (default
    :data:`DEFAULT_LIMITS`): list lengths (the layer count) before their items,
    then the network's size from :func:`spec_size`, all before anything is
    allocated. Keys other than the architecture's are kept only if their value is a
    scalar (a string of at most 256 characters, a number, a boolean or null).
    Raises :class:`ModelFileError` with a one-line reason.
    """
    lim = limits or DEFAULT_LIMITS
    if not isinstance(spec, dict):
        raise ModelFileError("architecture spec must be a JSON object")
    arch = spec.get("arch")
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        raise ModelFileError(f"unknown architecture {str(arch)[:40]!r} in spec")
    shape = spec.get("in_shape")
    if (not isinstance(shape, list) or len(shape) != 3 or not all(_is_int(v) for v in shape)
            or not 0 < shape[0] <= lim.max_channels or not all(0 < v <= lim.max_side for v in shape[1:])):
        raise ModelFileError(f"spec in_shape must be [C, H, W] with ints 0 < C <= {lim.max_channels}, "
                             f"0 < H, W <= {lim.max_side}")
    nc = spec.get("num_classes")
    if not _is_int(nc) or not 1 < nc <= lim.max_classes:
        raise ModelFileError(f"spec num_classes must be an int in [2, {lim.max_classes}]")
    full = model_spec(arch, shape, nc)
    own = set(full)
    for k, v in spec.items():
        if k in own:
            full[k] = v  # checked below, copied once checked
        elif not isinstance(k, str) or len(k) > 64:
            raise ModelFileError("spec keys must be short strings")
        elif v is None or isinstance(v, (bool, int, float)) or (isinstance(v, str) and len(v) <= _MAX_EXTRA_TEXT):
            full[k] = v
        else:
            raise ModelFileError(f"spec key {k!r} must hold a short scalar")
    w, layers = lim.max_width, lim.max_layers
    if arch in _CNNS:
        _int_list(full, "channels", 1, w, length=4, max_len=4)
        _int_list(full, "dense", 1, w, length=2, max_len=2)
        _dropout(full)
    elif arch == "mlp":
        _int_list(full, "hidden", 1, w, max_len=layers - 1)
        _dropout(full)
    elif arch == "vgg-small":
        blocks = full.get("blocks")
        if not isinstance(blocks, list) or not 1 <= len(blocks) <= layers:
            raise ModelFileError(f"spec blocks must be a list of 1 to {layers} lists of channel counts")
        for i, block in enumerate(blocks):
            _int_list({f"blocks[{i}]": block}, f"blocks[{i}]", 1, w, min_len=1, max_len=layers)
        _int_list(full, "dense", 1, w, max_len=layers)
        _dropout(full)
    n_layers = layer_count(full)
    if n_layers > layers:
        raise ModelFileError(f"spec has {n_layers} layers; at most {layers} are allowed")
    params, acts = spec_size(full)
    if params > lim.max_params:
        raise ModelFileError(f"spec describes {params:,} parameters; at most {lim.max_params:,} are allowed")
    if acts > lim.max_activations:
        raise ModelFileError(f"spec needs {acts:,} activation values per input; "
                             f"at most {lim.max_activations:,} are allowed")
    return copy.deepcopy(full)


def layer_count(spec: dict[str, Any]) -> int:
    """Conv + dense layers of a complete spec, the head included."""
    arch = spec["arch"]
    if arch in _CNNS:
        return 7
    if arch == "mlp":
        return len(spec["hidden"]) + 1
    if arch == "lenet5":
        return 5
    return sum(len(b) for b in spec["blocks"]) + len(spec["dense"]) + 1


def _conv_size(cin: int, cout: int, k: int) -> int:
    return cout * cin * k * k + cout


def spec_size(spec: dict[str, Any]) -> tuple[int, int]:
    """``(state values, activation values per input)`` of the network a complete spec describes.

    State values: every element of the state dict (weights, biases, batch-norm
    running statistics and counters), i.e. what a model file holds. Activation
    values: the outputs of every conv, max-pool and dense layer for one input
    (ReLU, batch norm and dropout reuse those sizes). Computed from the spec's
    numbers only (exact, Python integers); :class:`ModelFileError` if the input is
    too small for the architecture's pooling.
    """
    arch = spec["arch"]
    c, h, w = spec["in_shape"]
    nc = spec["num_classes"]
    params = acts = 0

    def dense(width: int, outs: list[int]) -> int:
        nonlocal params, acts
        for d in outs:
            params += width * d + d
            acts += d
            width = d
        return width

    if arch in _CNNS:
        c1, c2, c3, c4 = spec["channels"]
        if h < 4 or w < 4:
            raise ModelFileError(f"spec in_shape {[c, h, w]} is too small for {arch!r} (needs H, W >= 4)")
        h2, w2, h4, w4 = h // 2, w // 2, h // 4, w // 4
        params += _conv_size(c, c1, 3) + _conv_size(c1, c2, 3) + _conv_size(c2, c3, 3) + _conv_size(c3, c4, 3)
        acts += (c1 + c2) * h * w + c2 * h2 * w2 + (c3 + c4) * h2 * w2 + c4 * h4 * w4
        dense(dense(c4 * h4 * w4, spec["dense"]), [nc])
    elif arch == "mlp":
        dense(dense(c * h * w, spec["hidden"]), [nc])
    elif arch == "lenet5":
        pad2 = 2 if min(h, w) < 28 else 0
        h1, w1 = h // 2, w // 2  # conv1 (5x5, padding 2) keeps the size; pool halves it
        hc, wc = h1 + 2 * pad2 - 4, w1 + 2 * pad2 - 4
        hf, wf = hc // 2, wc // 2
        if min(hc, wc) < 1 or min(hf, wf) < 1:
            raise ModelFileError(f"spec in_shape {[c, h, w]} is too small for 'lenet5'")
        params += _conv_size(c, 6, 5) + _conv_size(6, 16, 5)
        acts += 6 * h * w + 6 * h1 * w1 + 16 * hc * wc + 16 * hf * wf
        dense(dense(16 * hf * wf, [120, 84]), [nc])
    elif arch == "vgg-small":
        for block in spec["blocks"]:
            for cout in block:
                params += _conv_size(c, cout, 3) + 4 * cout + 1  # conv + batch norm (2 params, 3 buffers)
                acts += cout * h * w
                c = cout
            if min(h, w) >= 2:
                h, w = h // 2, w // 2
                acts += c * h * w
        dense(dense(c * h * w, spec["dense"]), [nc])
    else:
        raise ModelFileError(f"unknown architecture {arch!r}")
    return params, acts


def expected_state(spec: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``{name: (shape, dtype)}`` of the state dict :func:`build_model` would create for ``spec``.

    Built on the ``meta`` device: no storage is allocated and nothing is initialised,
    so this costs microseconds per layer whatever the sizes. Validate untrusted
    specs first (:func:`validate_spec`), which bounds the number of layers.
    """
    with torch.device("meta"):
        model = build_model(spec)
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


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
    ``conv1``, ``conv2``, ... in order, their batch norms ``bn1``, ``bn2``, ...; dense
    layers ``fc1``, ... Each layer is registered once, under that name, so the state
    dict has no aliases and saves as safetensors."""

    def __init__(self, in_shape, num_classes, blocks, dense, dropout):
        super().__init__()
        c, h, w = in_shape
        body: list[nn.Module] = []
        self.pool = nn.MaxPool2d(2)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(dropout)
        idx = 0
        for block in blocks:
            for cout in block:
                idx += 1
                conv, bn = _conv(c, cout), nn.BatchNorm2d(cout)
                setattr(self, f"conv{idx}", conv)
                setattr(self, f"bn{idx}", bn)
                body += [conv, bn, self.relu]
                c = cout
            if min(h, w) >= 2:
                body.append(self.pool)
                h, w = h // 2, w // 2
        width = c * h * w
        fcs: list[nn.Module] = []
        for i, d in enumerate(dense, start=1):
            fc = nn.Linear(width, d)
            setattr(self, f"fc{i}", fc)
            fcs += [fc, self.relu, self.drop]
            width = d
        self.head = nn.Linear(width, num_classes)
        # Plain lists (not submodules): the order of application, over the layers registered above.
        self._body, self._mlp = body, fcs

    def features(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self._body:
            x = layer(x)
        x = x.flatten(1)
        for layer in self._mlp:
            x = layer(x)
        return x

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
