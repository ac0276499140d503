"""Making the forms a suspect can take: ONNX exports and int8 copies (for tests and experiments).

- :func:`export_onnx` -- ``torch.onnx.export`` with a dynamic batch axis, one
  input ``"input"`` and one output ``"output"``, written as one self-contained file.
- :func:`quantize_onnx` -- onnxruntime's int8 quantisers: ``"dynamic"``
  (``ConvInteger`` / ``MatMulInteger``, weights only) or ``"static"`` (QDQ or
  QOperator, weights and activations, calibrated on images).
- :func:`quantize_torch_dynamic` / :func:`quantize_torch_static` -- PyTorch's eager
  int8 quantisation (dynamic: ``Linear`` layers; static: ``Conv2d`` and
  ``Linear`` in a ``QuantWrapper``, calibrated on images). Static quantisation
  only works for networks whose forward accepts quantised tensors (the zoo's
  CNN does; residual ``+`` needs ``FloatFunctional``).

These helpers need the ``onnx`` extra for the ONNX parts (``pip install 'nnmark[onnx]'``).
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nnmark.targets.base import TargetError


@contextmanager
def _quiet() -> Any:
    """Silence the exporters' and quantisers' progress and deprecation chatter."""
    loggers = [logging.getLogger(name) for name in ("", "torch.onnx", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def export_onnx(model: nn.Module, path: str | Path, example_input: torch.Tensor, *, dynamo: bool = True,
                optimize: bool = True, opset: int | None = None) -> Path:
    """Export ``model`` (eval mode) to ``path`` for inputs like ``example_input`` ``(N, C, H, W)``.

    ``dynamo``: torch's default exporter (``torch.export``; needs onnxscript); ``False``:
    the TorchScript exporter. ``optimize``: the dynamo exporter's graph optimiser (which
    folds an eval-mode BatchNorm into the preceding Conv). The batch axis is dynamic.
    Returns ``path``.
    """
    path = Path(path)
    x = example_input.detach()
    if len(x) < 2:  # a batch of one would be specialised as a constant
        x = torch.cat([x, x])
    was_training = model.training
    model.eval()
    kwargs: dict[str, Any] = {"input_names": ["input"], "output_names": ["output"]}
    if opset is not None:
        kwargs["opset_version"] = opset
    if dynamo:
        kwargs.update(dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=False, optimize=optimize,
                      verbose=False)
    else:
        kwargs.update(dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    try:
        with _quiet(), torch.no_grad():
            torch.onnx.export(model, (x,), str(path), dynamo=dynamo, **kwargs)
    except ImportError as exc:
        raise TargetError(f"ONNX export needs the onnx extra (pip install 'nnmark[onnx]'): {exc}") from None
    finally:
        model.train(was_training)
    return path


class _Calibration:
    """onnxruntime's calibration reader over batches of images."""

    def __init__(self, input_name: str, batches: Iterable[torch.Tensor | np.ndarray]) -> None:
        self._it = iter([{input_name: np.asarray(b, dtype=np.float32)} for b in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def _batches(calibration: torch.Tensor | Iterable[torch.Tensor], batch_size: int = 64) -> list[torch.Tensor]:
    if isinstance(calibration, torch.Tensor):
        return [calibration[i: i + batch_size] for i in range(0, len(calibration), batch_size)]
    return [torch.as_tensor(b) for b in calibration]


def quantize_onnx(path_in: str | Path, path_out: str | Path, mode: str = "dynamic",
                  calibration: torch.Tensor | Iterable[torch.Tensor] | None = None, *, fmt: str = "qdq",
                  per_channel: bool = True) -> Path:
    """An int8 copy of the ONNX model ``path_in`` at ``path_out`` (onnxruntime.quantization).

    ``mode``: ``"dynamic"`` (weights int8, activations quantised at run time) or
    ``"static"`` (weights and activations int8; needs ``calibration``: images
    ``(N, C, H, W)`` or an iterable of such batches). ``fmt``: for static, ``"qdq"``
    (QuantizeLinear/DequantizeLinear pairs) or ``"qoperator"`` (QLinearConv, QGemm).
    ``per_channel``: one scale per output channel (else one per tensor). Returns ``path_out``.
    """
    try:
        import onnx
        from onnxruntime import quantization as q
    except ImportError:
        raise TargetError("ONNX quantisation needs the onnx extra: pip install 'nnmark[onnx]'") from None
    path_in, path_out = Path(path_in), Path(path_out)
    with _quiet():
        if mode == "dynamic":
            q.quantize_dynamic(str(path_in), str(path_out), weight_type=q.QuantType.QInt8, per_channel=per_channel)
        elif mode == "static":
            if calibration is None:
                raise TargetError("static quantisation needs calibration images")
            if fmt not in ("qdq", "qoperator"):
                raise TargetError(f"unknown quantisation format {fmt!r}; use 'qdq' or 'qoperator'")
            name = onnx.load(str(path_in), load_external_data=False).graph.input[0].name
            q.quantize_static(str(path_in), str(path_out), _Calibration(name, _batches(calibration)),
                              quant_format=q.QuantFormat.QDQ if fmt == "qdq" else q.QuantFormat.QOperator,
                              per_channel=per_channel, weight_type=q.QuantType.QInt8,
                              activation_type=q.QuantType.QUInt8)
        else:
            raise TargetError(f"unknown quantisation mode {mode!r}; use 'dynamic' or 'static'")
    return path_out


def quantize_torch_dynamic(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every ``nn.Linear`` dynamically quantised to int8 (per tensor)."""
    from torch.ao.quantization import quantize_dynamic

    with _quiet():
        return quantize_dynamic(copy.deepcopy(model).eval(), {nn.Linear}, dtype=torch.qint8)


def quantize_torch_static(model: nn.Module, calibration: torch.Tensor | Iterable[torch.Tensor],
                          engine: str | None = None) -> nn.Module:
    """A ``QuantWrapper`` around an int8 copy of ``model`` (eager static quantisation, per-channel weights).

    ``calibration``: images ``(N, C, H, W)`` (or batches) that set the activation
    ranges. ``engine``: the quantised backend (default ``torch.backends.quantized.engine``).
    """
    import torch.ao.quantization as tq

    engine = engine or torch.backends.quantized.engine
    with _quiet():
        wrapped = tq.QuantWrapper(copy.deepcopy(model).eval())
        wrapped.qconfig = tq.get_default_qconfig(engine)
        tq.prepare(wrapped, inplace=True)
        with torch.no_grad():
            for batch in _batches(calibration):
                wrapped(batch)
        tq.convert(wrapped, inplace=True)
    return wrapped.eval()
