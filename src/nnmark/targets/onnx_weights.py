"""The white-box read-out of an ONNX graph: initialisers back to PyTorch tensors.

Only initialisers are read; nothing is executed. Three things are undone:

1. **Quantisation.** An integer initialiser that a quantisation operator
   consumes as its weight is dequantised, ``w = (q - zero_point) * scale``, per
   tensor, per channel (``axis``) or per block (``block_size``), with the scale
   and zero point found in that operator's inputs:

   - QDQ (``onnxruntime.quantization.quantize_static``, ``QuantFormat.QDQ``):
     ``DequantizeLinear(conv4.weight_quantized, conv4.weight_scale,
     conv4.weight_zero_point, axis=0)``; int32 biases likewise.
   - QOperator: ``QLinearConv`` (weight input 3, scales 4/5, bias input 8 with
     scale ``x_scale * w_scale``), ``QGemm`` (3/4/5, bias 6), ``QLinearMatMul`` (3/4/5).
   - dynamic (``quantize_dynamic``): ``ConvInteger`` / ``MatMulInteger`` take only
     the zero point; the scale is the initialiser ``<name>_scale`` that
     onnxruntime writes beside ``<name>_quantized``.

   Scales and zero points are not weights and are left out of the read-out.
2. **Renaming.** onnxruntime names a quantised weight ``<name>_quantized``, and
   for a ``Gemm`` that ``quantize_dynamic`` turns into a ``MatMulInteger`` it
   stores the weight transposed as ``<name>_Transposed_quantized``; both are
   mapped back to ``<name>`` (transposed back to ``(out, in)``).
3. **Anonymous initialisers.** ``torch.onnx.export`` keeps state-dict names
   (``conv4.weight``) for weights used as they are, but names a weight it has
   transformed after the exporter's counter: the TorchScript exporter
   ``onnx::MatMul_52`` / ``onnx::Conv_47``, the dynamo exporter ``val_20`` --
   e.g. the transposed weight of a ``Linear`` applied to a 3-D input becomes a
   ``MatMul`` initialiser of shape ``(in, out)``. Such a tensor is renamed after
   the module of the node that consumes it (the TorchScript node name
   ``/blocks.0/tok/MatMul``, or the dynamo exporter's ``pkg.torch.onnx.name_scopes``
   metadata) and its role there (``Conv`` input 1 is the weight, input 2 the bias;
   a ``MatMul`` weight is transposed back; a ``Gemm`` weight is transposed back
   when ``transB=0``).

Exporters may also change values: both exporters fold an eval-mode
``BatchNorm`` into the preceding ``Conv`` (the dynamo exporter keeps the conv's
names for the folded tensors). :func:`read_onnx_weights` reports every renamed,
dequantised, folded or unrecovered tensor in its notes.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from nnmark.targets.base import TargetError, one_line

_GOOD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")
_ANON_NAME = re.compile(r"_?val_\d+")

# op type -> [(weight input, scale input or None, zero-point input or None, axis rule)] for weight dequantisation
_WEIGHT_QUANT: dict[str, list[tuple[int, int | None, int | None, str]]] = {
    "DequantizeLinear": [(0, 1, 2, "attr")],
    "QLinearConv": [(3, 4, 5, "first")],
    "QLinearMatMul": [(3, 4, 5, "last")],
    "QGemm": [(3, 4, 5, "gemm")],
    "ConvInteger": [(1, None, 3, "first")],
    "MatMulInteger": [(1, None, 3, "last")],
    "MatMulIntegerToFloat": [(1, 3, 5, "last")],
    "DynamicQuantizeMatMul": [(1, 2, 3, "last")],
    # a constant operand (e.g. the bias of a Linear exported as MatMul + Add), quantised like an activation
    "QLinearAdd": [(0, 1, 2, "first"), (3, 4, 5, "first")],
    "QLinearMul": [(0, 1, 2, "first"), (3, 4, 5, "first")],
}
# op type -> (bias input, activation-scale input, weight-scale input): int32 bias with scale x_scale * w_scale
_BIAS_QUANT: dict[str, tuple[int, int, int]] = {"QLinearConv": (8, 1, 4), "QGemm": (6, 1, 4)}
# op type -> {input: (parameter, transposed)} for naming an anonymous initialiser after its consumer
_ROLE: dict[str, dict[int, tuple[str, bool]]] = {
    "Conv": {1: ("weight", False), 2: ("bias", False)},
    "ConvTranspose": {1: ("weight", False), 2: ("bias", False)},
    "ConvInteger": {1: ("weight", False)},
    "QLinearConv": {3: ("weight", False), 8: ("bias", False)},
    "Gemm": {1: ("weight", False), 2: ("bias", False)},
    "QGemm": {3: ("weight", False), 6: ("bias", False)},
    "MatMul": {1: ("weight", True)},
    "MatMulInteger": {1: ("weight", True)},
    "QLinearMatMul": {3: ("weight", True)},
    "MatMulIntegerToFloat": {1: ("weight", True)},
    "DynamicQuantizeMatMul": {1: ("weight", True)},
}
# op type -> inputs that carry data (activations, weights, biases); its other constant inputs are scales
# and zero points. Other QLinear* operators: inputs 0 and 3 (QLinearAdd, QLinearMul, ...).
_DATA_INPUTS: dict[str, set[int]] = {
    "QuantizeLinear": {0}, "DequantizeLinear": {0}, "DynamicQuantizeLinear": {0},
    "QLinearConv": {0, 3, 8}, "QGemm": {0, 3, 6}, "QLinearMatMul": {0, 3},
    "ConvInteger": {0, 1}, "MatMulInteger": {0, 1}, "MatMulIntegerToFloat": {0, 1, 6},
    "DynamicQuantizeMatMul": {0, 1, 4},
}


def _data_inputs(op_type: str) -> set[int] | None:
    """Data inputs of a quantisation operator, or ``None`` when ``op_type`` is not one."""
    if op_type in _DATA_INPUTS:
        return _DATA_INPUTS[op_type]
    return {0, 3} if op_type.startswith("QLinear") else None


def is_torch_name(name: str) -> bool:
    """Whether ``name`` looks like a state-dict name (``blocks.0.conv.weight``), not an exporter's counter."""
    return bool(_GOOD_NAME.fullmatch(name)) and not _ANON_NAME.fullmatch(name)


@dataclass
class OnnxWeights:
    """The read-out: ``tensors`` by PyTorch name and notes on how each name and value was recovered."""

    tensors: dict[str, torch.Tensor]
    dequantized: dict[str, str] = field(default_factory=dict)  # torch name -> how (e.g. "int8 per-channel axis 0")
    renamed: dict[str, str] = field(default_factory=dict)  # torch name -> ONNX initialiser (and transposition)
    folded: list[str] = field(default_factory=list)  # tensors a BatchNorm was folded into by the exporter
    unnamed: list[str] = field(default_factory=list)  # float initialisers kept under their ONNX names
    skipped: dict[str, str] = field(default_factory=dict)  # ONNX initialiser -> why it was left out

    def notes(self) -> dict[str, Any]:
        """The non-empty notes, JSON-able."""
        out = {"dequantized": self.dequantized, "renamed": self.renamed, "folded": self.folded,
               "unnamed": self.unnamed, "skipped": self.skipped}
        return {k: v for k, v in out.items() if v}


def dequantize(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, axis: int = 1,
               block_size: int = 0) -> np.ndarray:
    """``(q - zero_point) * scale`` as float32, per tensor (scalar scale), per ``axis`` or per block along it."""
    x = q.astype(np.float64)
    s = np.asarray(scale, dtype=np.float64)
    z = np.zeros_like(s) if zero_point is None else np.asarray(zero_point, dtype=np.float64)
    if z.shape != s.shape:
        raise ValueError(f"zero point shape {z.shape} differs from scale shape {s.shape}")
    if s.size == 1 and block_size == 0:
        return ((x - z.reshape(())) * s.reshape(())).astype(np.float32)
    if x.ndim == 0:
        raise ValueError("a scalar cannot be quantised per axis")
    axis = axis % x.ndim
    if block_size:
        if s.ndim != x.ndim:
            raise ValueError("blocked scales need the rank of the data")
        s = np.repeat(s, block_size, axis=axis).take(range(x.shape[axis]), axis=axis)
        z = np.repeat(z, block_size, axis=axis).take(range(x.shape[axis]), axis=axis)
        if s.shape != x.shape:
            raise ValueError(f"blocked scale shape {s.shape} does not cover data shape {x.shape}")
    else:
        if s.ndim != 1 or s.size != x.shape[axis]:
            raise ValueError(f"{s.size} scales for axis {axis} of a tensor of shape {x.shape}")
        shape = [1] * x.ndim
        shape[axis] = s.size
        s, z = s.reshape(shape), z.reshape(shape)
    return ((x - z) * s).astype(np.float32)


def _attr(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _module_path(node: Any) -> str:
    """The PyTorch module that produced ``node`` ('' when unknown)."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return ""
            if isinstance(scopes, list) and len(scopes) >= 2 and isinstance(scopes[-2], str):
                return scopes[-2]
            return ""
    if node.name.startswith("/"):
        parts = node.name.strip("/").split("/")[:-1]
        return ".".join(parts)
    return ""


def _folded(node: Any) -> bool:
    return any(p.key == "pkg.onnxscript.rewriter.rule_name" and "BatchNorm" in p.value for p in node.metadata_props)


class _Graph:
    """Initialisers and their consumers, for one graph."""

    def __init__(self, graph: Any) -> None:
        from onnx import numpy_helper

        self.arrays: dict[str, np.ndarray] = {}
        self.types: dict[str, int] = {}
        for init in graph.initializer:
            try:
                self.arrays[init.name] = numpy_helper.to_array(init)
            except Exception as exc:
                raise TargetError(f"ONNX initialiser {init.name!r} is malformed: {one_line(exc)}") from None
            self.types[init.name] = init.data_type
        self.order = [init.name for init in graph.initializer]
        self.consumers: dict[str, list[tuple[Any, int]]] = {}
        self.producer: dict[str, Any] = {}
        for node in graph.node:
            for slot, name in enumerate(node.input):
                if name:
                    self.consumers.setdefault(name, []).append((node, slot))
            for name in node.output:
                self.producer[name] = node

    def array(self, node: Any, slot: int | None) -> np.ndarray | None:
        if slot is None or slot >= len(node.input) or not node.input[slot]:
            return None
        return self.arrays.get(node.input[slot])

    def effective_consumers(self, name: str) -> list[tuple[Any, int]]:
        """Consumers of ``name``, looking through the ``DequantizeLinear`` a QDQ graph puts in between."""
        out = []
        for node, slot in self.consumers.get(name, []):
            if node.op_type == "DequantizeLinear" and slot == 0:
                for out_name in node.output:
                    out.extend(self.consumers.get(out_name, []))
            else:
                out.append((node, slot))
        return out


def _weight_axis(rule: str, node: Any, q: np.ndarray) -> int:
    if rule == "attr":
        return int(_attr(node, "axis", 1))
    if rule == "first":
        return 0
    if rule == "gemm":
        return 0 if int(_attr(node, "transB", 0)) else 1
    return q.ndim - 1  # "last": per output column of a (K, N) matrix


def _params_for(g: _Graph, name: str, node: Any, slot: int, aux: set[str]) -> tuple | None:
    """(scale, zero point, axis, block size, op) for initialiser ``name`` at input ``slot`` of ``node``;
    ``None`` when that input is not a quantised weight; ``ValueError`` when its scales cannot be found."""
    q = g.arrays[name]
    spec = next((w for w in _WEIGHT_QUANT.get(node.op_type, []) if w[0] == slot), None)
    bias = _BIAS_QUANT.get(node.op_type)
    if spec:
        scale = g.array(node, spec[1])
        if scale is None and spec[1] is None and name.endswith("_quantized"):
            scale_name = name.removesuffix("_quantized") + "_scale"  # onnxruntime's dynamic quantiser
            scale = g.arrays.get(scale_name)
            if scale is not None:
                aux.add(scale_name)
        if scale is None:
            raise ValueError(f"no constant scale for {node.op_type} {node.name!r}")
        block = int(_attr(node, "block_size", 0)) if node.op_type == "DequantizeLinear" else 0
        return scale, g.array(node, spec[2]), _weight_axis(spec[3], node, q), block, node.op_type
    if bias and slot == bias[0]:
        xs, ws = g.array(node, bias[1]), g.array(node, bias[2])
        if xs is None or ws is None:
            raise ValueError(f"no constant scales for the bias of {node.op_type} {node.name!r}")
        return np.asarray(xs, np.float64) * np.asarray(ws, np.float64), None, 0, 0, node.op_type
    return None


def _quant_params(g: _Graph, aux: set[str]) -> tuple[dict[str, tuple], dict[str, str]]:
    """Initialiser -> (scale, zero point, axis, block size, op) for every quantised weight, and the failures."""
    found: dict[str, tuple] = {}
    failed: dict[str, str] = {}
    for name in g.order:  # scales and zero points are not weights
        for node, slot in g.consumers.get(name, []):
            data = _data_inputs(node.op_type)
            if data is not None and slot not in data:
                aux.add(name)
    for name in g.order:
        if g.arrays[name].dtype.kind not in "iu":
            continue
        for node, slot in g.consumers.get(name, []):
            try:
                params = _params_for(g, name, node, slot, aux)
            except (ValueError, TypeError) as exc:
                failed.setdefault(name, one_line(exc))
                continue
            if params is not None:
                found[name] = params
                failed.pop(name, None)
                break
    return found, failed


def _describe_quant(q: np.ndarray, scale: np.ndarray, axis: int, block: int, op: str) -> str:
    mode = f"per-block {block} axis {axis}" if block else ("per-tensor" if np.size(scale) == 1 else
                                                              f"per-channel axis {axis}")
    return f"{q.dtype} {mode} ({op})"


def read_onnx_weights(model: Any) -> OnnxWeights:
    """The read-out of ``model`` (an ``onnx.ModelProto`` whose tensors are all inline; see the module docstring)."""
    try:
        return _read(model)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:  # a malformed graph
        raise TargetError(f"cannot read the ONNX graph's weights: {type(exc).__name__}: {one_line(exc)}") from None


def _read(model: Any) -> OnnxWeights:
    g = _Graph(model.graph)
    aux: set[str] = set()
    quant, failed = _quant_params(g, aux)
    out = OnnxWeights(tensors={}, skipped=dict(failed))
    # name after undoing the quantiser's renaming -> (value, how it was dequantised, ONNX initialiser)
    pending: dict[str, tuple[np.ndarray, str, str]] = {}
    for name in g.order:
        if name in aux or name in failed:
            continue
        arr = g.arrays[name]
        base, how = name, ""
        if name in quant:
            scale, zp, axis, block, op = quant[name]
            try:
                arr = dequantize(arr, scale, zp, axis, block)
            except (ValueError, TypeError) as exc:
                out.skipped[name] = f"cannot dequantise: {exc}"
                continue
            how = _describe_quant(g.arrays[name], scale, axis, block, op)
            base = base.removesuffix("_quantized")
            if base.endswith("_Transposed") and arr.ndim == 2:
                base, arr = base.removesuffix("_Transposed"), arr.T
                how += ", stored transposed"
        elif arr.dtype.kind != "f":
            continue
        if base in pending:
            out.skipped[name] = f"a second tensor for {base!r} (kept {pending[base][2]!r})"
            continue
        pending[base] = (np.ascontiguousarray(arr, dtype=np.float32), how, name)
    taken = {k for k in pending if is_torch_name(k)}
    for base, (arr, how, onnx_name) in pending.items():
        torch_name = base
        recovered = None if is_torch_name(base) else _recover_name(g, onnx_name, arr)
        if recovered is not None and recovered[0] not in taken:
            torch_name, transposed = recovered
            if transposed:
                arr = np.ascontiguousarray(arr.T)
            out.renamed[torch_name] = onnx_name + (" (transposed)" if transposed else "")
            taken.add(torch_name)
        elif not is_torch_name(base):
            out.unnamed.append(base)
        if _computed_by_exporter(g, onnx_name, recovered is not None):
            out.folded.append(torch_name)
        if how:
            out.dequantized[torch_name] = how
        out.tensors[torch_name] = torch.from_numpy(arr.copy())
    return out


def _computed_by_exporter(g: _Graph, onnx_name: str, renamed: bool) -> bool:
    """Whether a conv tensor's values were computed by the exporter (a BatchNorm folded in).

    The dynamo exporter marks the rewritten node; the TorchScript exporter gives a
    conv tensor an ``onnx::`` name only when constant folding produced it.
    """
    for node, _ in g.effective_consumers(onnx_name):
        if _folded(node):
            return True
        if renamed and onnx_name.startswith("onnx::") and node.op_type in ("Conv", "ConvTranspose", "QLinearConv",
                                                                            "ConvInteger"):
            return True
    return False


def _recover_name(g: _Graph, name: str, arr: np.ndarray) -> tuple[str, bool] | None:
    """``(torch name, transposed)`` from the one role ``name`` plays in the graph, or ``None``."""
    candidates = set()
    for node, slot in g.effective_consumers(name):
        role = _ROLE.get(node.op_type, {}).get(slot)
        path = _module_path(node)
        if role is None or not path or not is_torch_name(path):
            return None
        param, transposed = role
        if node.op_type in ("Gemm", "QGemm") and param == "weight":
            transposed = not int(_attr(node, "transB", 0))
        if transposed and arr.ndim != 2:
            return None
        candidates.add((f"{path}.{param}", transposed))
    return candidates.pop() if len(candidates) == 1 else None
