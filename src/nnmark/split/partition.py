"""Split a sequential zoo network at a named partition point into a local and a remote part.

A zoo network (:mod:`nnmark.models.zoo`: ``cnn*``, ``mlp``, ``lenet5``) is read as an ordered list of
*blocks*, each named after the layer it ends with; the partition point ``at`` is a block name and the cut
lies right after it:

- CNN: ``conv1, conv2, pool1, conv3, conv4, pool2, fc1, fc2, head`` (each conv / fc block includes its
  ReLU, each fc block its dropout).
- MLP: ``fc1 .. fcK, head`` (each fc block with its ReLU and dropout); the paper's "first two layers"
  is ``at="fc2"``.
- LeNet-5: ``conv1, pool1, conv2, pool2, fc1, fc2, head``.

:class:`Part` registers the layers of its blocks under their original names (``conv4``, ``fc1``...), so
``local.state_dict()`` and ``remote.state_dict()`` are disjoint pieces of the whole network's state dict
(:func:`join_parts` rebuilds the network), and the fingerprint carrier finds its layer in the remote part
by the same name (``get_layer(remote, "conv4")``).

Dropout inside a part draws its masks from the part's own ``torch.Generator`` (seeded by the party), not
from the process-global RNG, so a part computes the same thing whether its party runs in this process or
in its own (the simulation and the real parties agree bit for bit).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from nnmark.errors import NNMarkError


class SplitError(NNMarkError):
    """A partition, a protocol configuration or a party message is not valid."""


Step = Callable[["Part", torch.Tensor], torch.Tensor]


def _dropout(part: Part, x: torch.Tensor) -> torch.Tensor:
    p = part.dropout
    if not part.training or p == 0:
        return x
    keep = torch.rand(x.shape, generator=part.generator, dtype=x.dtype) >= p
    return x * keep / (1.0 - p)


def _conv(name: str) -> Step:
    return lambda part, x: torch.relu(getattr(part, name)(x))


def _pool(part: Part, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.max_pool2d(x, 2)


def _fc(name: str, dropout: bool = True) -> Step:
    def step(part: Part, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(getattr(part, name)(x.flatten(1)))
        return _dropout(part, y) if dropout else y
    return step


def _head(part: Part, x: torch.Tensor) -> torch.Tensor:
    return part.head(x.flatten(1))


def blocks_of(model: nn.Module) -> list[tuple[str, str | None, Step]]:
    """``[(block name, layer attribute or None, step), ...]`` of a zoo network, in order (see the module doc).
    Raises :class:`SplitError` for an architecture that is not sequential here (``vgg-small``)."""
    arch = getattr(model, "spec", {}).get("arch")
    if arch in ("cnn", "cnn-200", "cnn-cifar"):
        return [("conv1", "conv1", _conv("conv1")), ("conv2", "conv2", _conv("conv2")), ("pool1", None, _pool),
                ("conv3", "conv3", _conv("conv3")), ("conv4", "conv4", _conv("conv4")), ("pool2", None, _pool),
                ("fc1", "fc1", _fc("fc1")), ("fc2", "fc2", _fc("fc2")), ("head", "head", _head)]
    if arch == "mlp":
        n = int(model.n_hidden)
        return [(f"fc{i}", f"fc{i}", _fc(f"fc{i}")) for i in range(1, n + 1)] + [("head", "head", _head)]
    if arch == "lenet5":
        return [("conv1", "conv1", _conv("conv1")), ("pool1", None, _pool), ("conv2", "conv2", _conv("conv2")),
                ("pool2", None, _pool), ("fc1", "fc1", _fc("fc1", False)), ("fc2", "fc2", _fc("fc2", False)),
                ("head", "head", _head)]
    raise SplitError(f"cannot partition architecture {arch!r}; sequential ones: cnn, cnn-200, cnn-cifar, mlp, lenet5")


def partition_points(model: nn.Module) -> list[str]:
    """The block names a model can be cut after (every block but the head)."""
    return [name for name, _layer, _step in blocks_of(model)][:-1]


class Part(nn.Module):
    """A run of consecutive blocks of a zoo network (shares the network's layers; see the module doc).

    ``forward(x)``: the blocks applied in order. ``dropout``: the network's dropout probability.
    ``generator``: the RNG of dropout masks (set by the owning party; default seeded 0)."""

    def __init__(self, model: nn.Module, blocks: list[tuple[str, str | None, Step]], role: str) -> None:
        super().__init__()
        self.role = role
        self.block_names = [b[0] for b in blocks]
        self._steps = [b[2] for b in blocks]
        for _name, layer, _step in blocks:
            if layer is not None:
                setattr(self, layer, getattr(model, layer))
        self.dropout = float(getattr(model, "spec", {}).get("dropout", 0.0) or 0.0)
        self.generator = torch.Generator().manual_seed(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for step in self._steps:
            x = step(self, x)
        return x


def split_model(model: nn.Module, at: str) -> tuple[Part, Part]:
    """``(local, remote)``: the network cut right after block ``at`` (see :func:`partition_points`).
    Both parts share the network's layers (train them, and ``model`` changes). Raises :class:`SplitError`
    naming the valid points."""
    blocks = blocks_of(model)
    names = [b[0] for b in blocks]
    if at not in names[:-1]:
        raise SplitError(f"no partition point {at!r} in this {model.spec.get('arch')}; "
                         f"points: {', '.join(names[:-1])}")
    i = names.index(at) + 1
    return Part(model, blocks[:i], "local"), Part(model, blocks[i:], "remote")


def activation_shape(local: Part, image_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of one input's activation at the cut (without the batch dimension)."""
    was = local.training
    local.eval()
    with torch.no_grad():
        out = local(torch.zeros(1, *image_shape))
    local.train(was)
    return tuple(out.shape[1:])


def join_parts(spec: dict[str, Any], local_state: dict[str, torch.Tensor],
               remote_state: dict[str, torch.Tensor]) -> nn.Module:
    """The whole network of ``spec`` with the two parts' state dicts loaded (strict: together they must hold
    exactly the network's tensors)."""
    from nnmark.models import build_model

    model = build_model(spec)
    overlap = set(local_state) & set(remote_state)
    if overlap:
        raise SplitError(f"the parts' states overlap: {sorted(overlap)}")
    model.load_state_dict({**local_state, **remote_state}, strict=True)
    return model
