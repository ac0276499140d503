"""An ONNX file as a target: initialisers for white-box checks, onnxruntime for black-box ones.

Reading (:func:`load_onnx`) executes nothing: ``onnx.load(path,
load_external_data=False)`` on a file of bounded size (:data:`MAX_ONNX_BYTES`,
protobuf's own 2 GiB limit). Tensors stored in external data files (the dynamo
exporter writes ``model.onnx.data`` beside ``model.onnx`` unless told
``external_data=False``) are read by nnmark itself, and only when safe: the
location must be a plain file name in the ONNX file's own folder (no path
separators, no ``..``, no absolute path, no symbolic link leading elsewhere),
and the byte range must lie inside that file and match the tensor's shape and
type. Anything else is refused, so a hostile ONNX file cannot make nnmark (or
onnxruntime, which only ever sees the checked, inlined model) read other files.

:meth:`OnnxTarget.weights` is :func:`nnmark.targets.onnx_weights.read_onnx_weights`;
:meth:`OnnxTarget.oracle` runs the model in onnxruntime (CPU, bounded threads);
:meth:`OnnxTarget.module` builds the verifier's architecture (``--arch
package.module:factory``) and loads the read-out into it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from nnmark.targets.base import Target, TargetError, one_line
from nnmark.targets.factory import build_from_factory, load_into
from nnmark.targets.onnx_weights import OnnxWeights, read_onnx_weights
from nnmark.targets.readers import file_size

if TYPE_CHECKING:
    from nnmark.targets.onnx_oracle import OnnxOracle

MAX_ONNX_BYTES = 2 << 30  # protobuf cannot hold more
MAX_EXTERNAL_BYTES = 4 << 30
_FOUR_BIT = {21, 22, 23}  # UINT4, INT4, FLOAT4E2M1: two values per byte


def require_onnx() -> Any:
    """The ``onnx`` module, or a :class:`TargetError` saying how to install it."""
    try:
        import onnx
    except ImportError:
        raise TargetError("reading ONNX files needs the onnx package: pip install 'nnmark[onnx]'") from None
    return onnx


def _tensors(graph: Any) -> list[Any]:
    """Every TensorProto of ``graph``: initialisers and constant attributes, subgraphs included."""
    out = list(graph.initializer)
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                out.append(attr.t)
            out.extend(attr.tensors)
            if attr.HasField("g"):
                out.extend(_tensors(attr.g))
            for sub in attr.graphs:
                out.extend(_tensors(sub))
    return out


def _nbytes(tensor: Any) -> int:
    from onnx import TensorProto, helper

    count = math.prod(tensor.dims)
    if tensor.data_type in _FOUR_BIT:
        return (count + 1) // 2
    if tensor.data_type in (TensorProto.STRING, TensorProto.UNDEFINED):
        raise TargetError(f"ONNX tensor {tensor.name!r}: external data of type {tensor.data_type} is not supported")
    return count * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def _inline_external(model: Any, path: Path) -> int:
    """Replace every external-data reference by the checked bytes it points to; return the bytes read."""
    from onnx import TensorProto

    folder = path.resolve().parent
    total = 0
    for tensor in _tensors(model.graph):
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        loc = info.get("location", "")
        if (not loc or "/" in loc or "\\" in loc or "\x00" in loc or loc in (".", "..")
                or Path(loc).is_absolute() or ":" in loc):
            raise TargetError(f"{path}: tensor {tensor.name!r} refers to external data {loc!r} outside the "
                              "model's folder; refusing")
        data_file = (folder / loc).resolve()
        if data_file.parent != folder or not data_file.is_file():
            raise TargetError(f"{path}: external data {loc!r} of tensor {tensor.name!r} is not a file in the "
                              "model's folder; refusing")
        try:
            offset = int(info.get("offset", "0"))
            expected = _nbytes(tensor)
            length = int(info.get("length", str(expected)))
        except ValueError:
            raise TargetError(f"{path}: tensor {tensor.name!r} has a malformed external-data entry") from None
        size = data_file.stat().st_size
        if length != expected or offset < 0 or offset + length > size:
            raise TargetError(f"{path}: external data of tensor {tensor.name!r} ({length} bytes at {offset}) does "
                              f"not fit its shape ({expected} bytes) inside {loc} ({size} bytes); refusing")
        total += length
        if total > MAX_EXTERNAL_BYTES:
            raise TargetError(f"{path}: more than {MAX_EXTERNAL_BYTES >> 30} GiB of external data; refusing")
        with data_file.open("rb") as fh:
            fh.seek(offset)
            tensor.raw_data = fh.read(length)
        del tensor.external_data[:]
        tensor.data_location = TensorProto.DEFAULT
    return total


def load_onnx(path: str | Path, max_bytes: int = MAX_ONNX_BYTES) -> Any:
    """A self-contained ``onnx.ModelProto`` from ``path`` (checked external data inlined); nothing executed."""
    onnx = require_onnx()
    path = Path(path)
    file_size(path, limit=max_bytes)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise TargetError(f"{path} is not a valid ONNX file: {type(exc).__name__}: {one_line(exc)[:160]}") from None
    if not model.graph.node or not model.graph.output:
        raise TargetError(f"{path} is not an ONNX model (no graph)")
    _inline_external(model, path)
    return model


class OnnxTarget(Target):
    """An ONNX file (float or quantised; see the module docstring).

    ``factory`` / ``factory_kwargs``: the verifier's torch architecture, only for
    :meth:`module`. ``threads``: onnxruntime's intra-op threads for :meth:`oracle`
    (default 1). ``task``: how the oracle reads outputs (an object with
    ``read(outputs)``, e.g. :mod:`nnmark.tasks`); default: arg-max labels.
    """

    def __init__(self, path: str | Path, *, factory: str | None = None,
                 factory_kwargs: dict[str, Any] | str | None = None, threads: int = 1, task: Any = None) -> None:
        self.path = Path(path)
        self.factory = factory
        self.factory_kwargs = factory_kwargs
        self.threads = threads
        self.task = task
        self.proto = load_onnx(self.path)
        self._readout: OnnxWeights | None = None

    def readout(self) -> OnnxWeights:
        """The white-box read-out with its notes (cached)."""
        if self._readout is None:
            self._readout = read_onnx_weights(self.proto)
        return self._readout

    def describe(self) -> dict[str, Any]:
        graph = self.proto.graph
        out: dict[str, Any] = {
            "kind": "onnx", "path": str(self.path),
            "producer": f"{self.proto.producer_name} {self.proto.producer_version}".strip(),
            "opset": {o.domain or "ai.onnx": o.version for o in self.proto.opset_import},
            "inputs": [i.name for i in graph.input], "outputs": [o.name for o in graph.output],
            "quantized": bool(self.readout().dequantized),
        }
        if self.factory:
            out["architecture"] = self.factory
        out.update(self.readout().notes())
        return out

    def weights(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.readout().tensors.items()}

    def module(self) -> nn.Module:
        if not self.factory:
            raise TargetError(f"{self.path} is an ONNX file: it runs in onnxruntime (black-box checks use that); "
                              "to run it as a torch module give --arch package.module:factory")
        model = build_from_factory(self.factory, self.factory_kwargs)
        state = self.weights()
        for k, v in model.state_dict().items():  # integer buffers (e.g. num_batches_tracked) are not in ONNX
            if k not in state and not v.is_floating_point():
                state[k] = v
        return load_into(model, state, self.factory, str(self.path))

    def oracle(self, budget: int | None = None) -> OnnxOracle:
        from nnmark.targets.onnx_oracle import OnnxOracle

        return OnnxOracle(self.proto, budget=budget, threads=self.threads, task=self.task, source=str(self.path))
