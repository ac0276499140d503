"""A user's architecture named as ``package.module:callable`` (the ``--arch`` of the CLI).

A bare state dict or an ONNX file holds weights but no torch code. Where nnmark
must run a torch module built from such a file (serving, attacks, black-box
checks in torch) the *verifier* names the architecture: ``"mypkg.nets:make_cnn"``
is imported and called with no arguments, or with keyword arguments given as a
dict or a JSON object string (``'{"width": 64}'``), and the file's weights are
loaded with ``load_state_dict(strict=True)``.

The factory is trusted code, chosen by whoever runs the verification, exactly
like any other Python they import. It is never read from the suspect file: a
model file cannot make nnmark import or run anything.
"""

from __future__ import annotations

import importlib
import json
from typing import Any

import torch
from torch import nn

from nnmark.targets.base import TargetError, one_line


def parse_kwargs(kwargs: dict[str, Any] | str | None) -> dict[str, Any]:
    """Factory keyword arguments from a dict, a JSON object string, or ``None`` (none)."""
    if kwargs is None:
        return {}
    if isinstance(kwargs, str):
        try:
            kwargs = json.loads(kwargs)
        except json.JSONDecodeError as exc:
            raise TargetError(f"factory arguments are not valid JSON: {exc.msg} at position {exc.pos}") from None
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise TargetError("factory arguments must be a JSON object of keyword arguments")
    return dict(kwargs)


def resolve_factory(spec: str) -> Any:
    """The callable named by ``"package.module:callable"`` (``callable`` may be dotted: ``Cls.build``)."""
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise TargetError(f"architecture must be named as package.module:callable, got {spec!r}")
    mod_name, attr_path = spec.split(":")
    if not mod_name or not attr_path:
        raise TargetError(f"architecture must be named as package.module:callable, got {spec!r}")
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as exc:
        raise TargetError(f"cannot import {mod_name!r} for architecture {spec}: {one_line(exc)}") from None
    except Exception as exc:  # the module itself failed while importing
        raise TargetError(f"importing {mod_name!r} for architecture {spec} failed: "
                          f"{type(exc).__name__}: {one_line(exc)}") from None
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise TargetError(f"{mod_name!r} has no attribute {attr_path!r} (architecture {spec})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TargetError(f"architecture {spec} is not callable")
    return obj


def build_from_factory(spec: str, kwargs: dict[str, Any] | str | None = None) -> nn.Module:
    """Call the factory named by ``spec`` and check that it returned an ``nn.Module``."""
    fn = resolve_factory(spec)
    args = parse_kwargs(kwargs)
    try:
        model = fn(**args)
    except Exception as exc:
        raise TargetError(f"architecture {spec} failed to build: {type(exc).__name__}: {one_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise TargetError(f"architecture {spec} returned {type(model).__name__}, not a torch nn.Module")
    return model


def state_mismatch(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> str:
    """Empty when ``given`` fits ``expected`` name for name and shape, else a short list of differences."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [k for k in expected if k in given and tuple(given[k].shape) != tuple(expected[k].shape)]
    parts = []
    if missing:
        parts.append(f"missing {', '.join(missing[:4])}" + (f" (+{len(missing) - 4})" if len(missing) > 4 else ""))
    if unexpected:
        parts.append(f"unexpected {', '.join(unexpected[:4])}"
                     + (f" (+{len(unexpected) - 4})" if len(unexpected) > 4 else ""))
    for k in shapes[:3]:
        parts.append(f"{k} is {tuple(given[k].shape)} in the file, {tuple(expected[k].shape)} in the architecture")
    return "; ".join(parts)


def load_into(model: nn.Module, state: dict[str, torch.Tensor], spec: str, source: str) -> nn.Module:
    """``model.load_state_dict(state, strict=True)`` with a one-line error naming the mismatches; eval mode."""
    expected = model.state_dict()
    diff = state_mismatch(expected, state)
    if diff:
        raise TargetError(f"{source} does not fit architecture {spec}: {diff}")
    cast = {k: v.to(expected[k].dtype) for k, v in state.items()}
    try:
        model.load_state_dict(cast, strict=True)
    except (RuntimeError, ValueError) as exc:
        raise TargetError(f"{source} does not fit architecture {spec}: {one_line(exc)}") from None
    return model.eval()
