"""Wire formats of the inference protocols nnmark speaks, as pure functions on bytes and headers.

Nothing here opens a connection: the client (:class:`nnmark.serving.client.HTTPOracle`)
and the server (:mod:`nnmark.serving.server`) move the bytes; this module turns
images into request bodies and answers into arrays, and back, with every size
checked before anything is allocated.

Three protocols, chosen by name (:data:`PROTOCOLS`):

- ``nnmark`` -- nnmark's own: ``POST /predict`` with ``{"images": [...]}`` (nested
  lists ``(N, C, H, W)``) -> ``{"labels": [...]}``; optional ``GET /health`` for the
  server's limits. JSON only (for binary tensors, serve and query the same server
  with ``oip``).
- ``oip`` -- the Open Inference Protocol (KServe v2 REST; Triton, KServe, MLServer,
  ``nnmark serve --protocol oip``): ``POST /v2/models/{name}[/versions/{v}]/infer``;
  optional ``GET /v2/models/{name}`` (input name, datatype and shape, output names)
  and ``GET /v2`` (the server's extensions). Tensors travel in binary with the
  binary tensor extension (a JSON header of ``Inference-Header-Content-Length``
  bytes, then each tensor's raw little-endian bytes, ``binary_data_size`` each;
  outputs asked for in binary too) when the server lists ``binary_tensor_data``
  or says nothing; a server that refuses it (4xx) is asked again in JSON ``data``.
- ``tfserving`` -- TensorFlow Serving's REST API: ``POST /v1/models/{name}[/versions/{v}]:predict``
  with ``{"instances": [...]}`` -> ``{"predictions": [...]}``; optional
  ``GET /v1/models/{name}/metadata`` (the ``serving_default`` signature). JSON only:
  TF-Serving's REST API has no binary form for numeric tensors.

An answer is read for the host's task (:func:`read_outputs`): a classifier's answer
may be labels (integers) or scores per class (logits or probabilities: the arg-max
is its label); an image-to-image host answers images. Images go out in the layout
the server declares when it declares one (``(C, H, W)``, ``(H, W, C)``, ``(H, W)`` for
one channel, or flat ``C*H*W``).

Every malformed message is a :class:`ProtocolError` (one line, with an HTTP status
for the server to answer with).
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote

import numpy as np

from nnmark.safejson import JSONLimitError
from nnmark.safejson import loads as bounded_loads

PROTOCOLS = ("nnmark", "oip", "tfserving")
HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_EXTENSION = "binary_tensor_data"
#: most values in one tensor of an answer (8 Mi: 32 MiB of float32)
MAX_ELEMENTS = 8 << 20
MAX_DIMS = 8

#: Open Inference Protocol datatypes -> little-endian numpy dtypes (BYTES and BF16 are not supported)
OIP_DATATYPES: dict[str, np.dtype] = {name: np.dtype(code) for name, code in (
    ("BOOL", "?"), ("UINT8", "u1"), ("UINT16", "<u2"), ("UINT32", "<u4"), ("UINT64", "<u8"),
    ("INT8", "i1"), ("INT16", "<i2"), ("INT32", "<i4"), ("INT64", "<i8"),
    ("FP16", "<f2"), ("FP32", "<f4"), ("FP64", "<f8"))}
_FLOAT_DATATYPES = ("FP16", "FP32", "FP64")


class ProtocolError(ValueError):
    """A request or an answer does not follow its protocol (message: one line; ``status``: HTTP status)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _one_line(text: Any, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_json(raw: bytes, what: str, max_bytes: int) -> Any:
    """``raw`` parsed with the bounded reader (:func:`nnmark.safejson.loads`; NaN/Infinity refused)."""
    try:
        return bounded_loads(raw, max_bytes=max_bytes, allow_constants=False, what=what)
    except JSONLimitError as exc:
        raise ProtocolError(str(exc).replace(" is not valid JSON", " is not JSON", 1)) from None


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def json_array(arr: np.ndarray) -> str:
    """A finite float32/int array as nested JSON lists, each float in its shortest float32 form.

    ``0.003921569`` instead of float64's ``0.003921568859368563``: about half the bytes of
    ``json.dumps(arr.tolist())``, and it reads back to the same float32 values.
    """
    if arr.ndim == 0:
        return str(arr.item() if arr.dtype.kind in "iub" else arr)
    if arr.ndim == 1:
        values = arr.tolist() if arr.dtype.kind in "iub" else arr
        return "[" + ",".join(map(str, values)) + "]"
    return "[" + ",".join(json_array(a) for a in arr) + "]"


# -- shapes and tensors ------------------------------------------------------------------

def check_shape(value: Any, what: str, max_elements: int = MAX_ELEMENTS) -> tuple[int, ...]:
    """A tensor shape from a message: a list of at most 8 non-negative integers whose product
    (the number of values) is at most ``max_elements``."""
    if not isinstance(value, list) or len(value) > MAX_DIMS or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise ProtocolError(f"{what}: shape must be a list of at most {MAX_DIMS} non-negative integers")
    count = math.prod(value)
    if count > max_elements:
        raise ProtocolError(f"{what}: shape {value} holds {count} values, over the limit of {max_elements}", 413)
    return tuple(value)


def _datatype(value: Any, what: str) -> np.dtype:
    if value not in OIP_DATATYPES:
        raise ProtocolError(f"{what}: unsupported datatype {_one_line(value, 20)!r} "
                            f"(supported: {', '.join(OIP_DATATYPES)})")
    return OIP_DATATYPES[value]


def _json_values(data: Any, shape: tuple[int, ...], dtype: np.dtype, what: str) -> np.ndarray:
    """JSON ``data`` (flat row-major, or nested) as an array of ``shape`` and ``dtype``."""
    if not isinstance(data, list):
        raise ProtocolError(f"{what}: \"data\" must be a list")
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError):  # ragged nesting
        raise ProtocolError(f"{what}: \"data\" is not a rectangular list of numbers") from None
    if arr.size and arr.dtype.kind not in "biuf":  # strings, null, objects, huge integers
        raise ProtocolError(f"{what}: \"data\" values must be numbers")
    if arr.size != math.prod(shape):
        raise ProtocolError(f"{what}: {arr.size} values for shape {list(shape)}")
    if dtype.kind in "iu" and arr.dtype.kind == "f":
        raise ProtocolError(f"{what}: fractional values for an integer datatype")
    return arr.reshape(shape).astype(dtype.newbyteorder("="), copy=False)


def decode_tensor(spec: Any, binary: memoryview | None, offset: int, what: str,
                  max_elements: int = MAX_ELEMENTS) -> tuple[np.ndarray, int]:
    """One OIP tensor (``{"name", "datatype", "shape", "data" | "parameters": {"binary_data_size"}}``).

    ``binary``: the message's binary part (``None`` when it has none), read from ``offset``.
    The declared size must equal ``prod(shape) * itemsize`` and fit in what is left,
    checked before the bytes are viewed. Returns ``(array in native byte order, new offset)``.
    """
    if not isinstance(spec, dict):
        raise ProtocolError(f"{what} must be an object")
    dtype = _datatype(spec.get("datatype"), what)
    shape = check_shape(spec.get("shape"), what, max_elements)
    params = spec.get("parameters") if isinstance(spec.get("parameters"), dict) else {}
    size = params.get("binary_data_size")
    if size is None:
        if "data" not in spec:
            raise ProtocolError(f"{what} has neither \"data\" nor a binary_data_size")
        return _json_values(spec["data"], shape, dtype, what), offset
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ProtocolError(f"{what}: binary_data_size must be a non-negative integer")
    expected = math.prod(shape) * dtype.itemsize
    if size != expected:
        raise ProtocolError(f"{what}: binary_data_size {size} does not match shape {list(shape)} of "
                            f"{spec['datatype']} ({expected} bytes)")
    if binary is None or offset + size > len(binary):
        left = 0 if binary is None else len(binary) - offset
        raise ProtocolError(f"{what}: {size} binary bytes declared, {left} present")
    arr = np.frombuffer(binary[offset:offset + size], dtype=dtype).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=True), offset + size


def split_binary(body: bytes, headers: Mapping[str, str], max_header: int) -> tuple[bytes, memoryview | None]:
    """``(JSON part, binary part or None)`` of an OIP message, from ``Inference-Header-Content-Length``."""
    text = headers.get(HEADER_LENGTH)
    if text is None:
        return body, None
    try:
        length = int(str(text).strip())
    except ValueError:
        raise ProtocolError(f"invalid {HEADER_LENGTH} {_one_line(text, 40)!r}") from None
    if not 0 < length <= len(body):
        raise ProtocolError(f"{HEADER_LENGTH} {length} is outside the body of {len(body)} bytes")
    if length > max_header:
        raise ProtocolError(f"JSON header of {length} bytes is over the limit of {max_header}", 413)
    return body[:length], memoryview(body)[length:]


def decode_tensors(items: Any, binary: memoryview | None, what: str,
                   max_elements: int = MAX_ELEMENTS) -> list[tuple[str, np.ndarray]]:
    """The tensors of an OIP ``inputs`` / ``outputs`` list, in order; every binary byte must be used."""
    if not isinstance(items, list) or not items:
        raise ProtocolError(f"{what} must be a non-empty list of tensors")
    out, offset = [], 0
    for i, spec in enumerate(items[:64]):
        name = spec.get("name") if isinstance(spec, dict) else None
        label = f"{what}[{i}]" + (f" {_one_line(name, 40)!r}" if isinstance(name, str) else "")
        arr, offset = decode_tensor(spec, binary, offset, label, max_elements)
        out.append((str(name), arr))
    if binary is not None and offset != len(binary):
        raise ProtocolError(f"{what}: {len(binary) - offset} binary bytes left over after the declared tensors")
    return out


# -- images in the server's layout; answers read for the task ---------------------------

@dataclass
class TensorSpec:
    """An input or output a server declares: ``shape`` with ``-1`` for any size (batch first)."""

    name: str
    datatype: str = "FP32"
    shape: list[int] | None = None


def _dims_fit(declared: Sequence[int], actual: Sequence[int]) -> bool:
    return len(declared) == len(actual) and all(d in (-1, a) for d, a in zip(declared, actual, strict=True))


def fit_input(x: np.ndarray, shape: Sequence[int] | None) -> tuple[np.ndarray, str]:
    """Images ``x`` ``(N, C, H, W)`` in the declared input layout; returns ``(array, layout)``.

    ``shape``: the declared shape, batch first (``None``: send ``(N, C, H, W)``). Layouts tried
    in order: ``NCHW``, ``NHWC``, ``NHW`` (one channel), ``NF`` (flat ``C*H*W``).
    """
    if shape is None:
        return x, "NCHW"
    dims = list(shape)[1:]
    n, c, h, w = x.shape
    if _dims_fit(dims, (c, h, w)):
        return x, "NCHW"
    if _dims_fit(dims, (h, w, c)):
        return np.ascontiguousarray(x.transpose(0, 2, 3, 1)), "NHWC"
    if c == 1 and _dims_fit(dims, (h, w)):
        return x[:, 0], "NHW"
    if _dims_fit(dims, (c * h * w,)):
        return x.reshape(n, -1), "NF"
    raise ProtocolError(f"the model's input shape {list(shape)} does not fit images of shape ({c}, {h}, {w})")


def read_outputs(y: np.ndarray, n: int, task_name: str, layout: str = "NCHW",
                 num_classes: int | None = None) -> np.ndarray:
    """What the host's task reads from an answer ``y`` for ``n`` images.

    ``task_name`` ``"classification"``: labels ``(n,)`` int64, from integer labels ``(n,)`` /
    ``(n, 1)`` (or integral floats), or from scores ``(n, K)``, ``K >= 2`` (logits or
    probabilities: the arg-max). ``num_classes``: labels must lie in ``0..num_classes-1``.
    Any other task: float32 images ``(n, ...)`` (``NHWC`` answers to ``NHWC`` inputs are
    turned back to ``(n, C, H, W)``); the caller's task clamps them.
    """
    if y.ndim == 0 or y.shape[0] != n:
        raise ProtocolError(f"answer of shape {list(y.shape)} for {n} images")
    if y.dtype.kind not in "biuf":
        raise ProtocolError(f"answer of dtype {y.dtype} is not numeric")
    if y.dtype.kind == "f" and not np.isfinite(y).all():
        raise ProtocolError("answer holds non-finite values")
    if task_name != "classification":
        if y.dtype.kind != "f" or y.ndim < 2:
            raise ProtocolError(f"an image-to-image host must answer float images, got {y.dtype} {list(y.shape)}")
        if layout == "NHWC" and y.ndim == 4:
            y = y.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(y, dtype=np.float32)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim == 2 and y.dtype.kind == "f" and y.shape[1] >= 2:
        labels = y.argmax(1)
    elif y.ndim == 1 and (y.dtype.kind in "biu" or bool((y == np.round(y)).all())):
        labels = y.astype(np.int64)
    else:
        raise ProtocolError(f"a classifier must answer labels (N,) or scores (N, classes); got {y.dtype} "
                            f"{list(y.shape)}")
    labels = labels.astype(np.int64)
    if len(labels) and (labels.min() < 0 or (num_classes and labels.max() >= num_classes)):
        raise ProtocolError(f"label outside 0..{num_classes - 1}" if num_classes else "negative label")
    return labels


# -- client side: one wire object per protocol -----------------------------------------

@dataclass
class Encoded:
    """One request: ``POST path`` with ``body`` and ``headers``; ``binary``: tensors in binary."""

    path: str
    body: bytes
    headers: dict[str, str]
    binary: bool = False


@dataclass
class Wire(ABC):
    """A protocol's client side: optional probes, then requests and answers (no I/O here).

    ``probes()`` lists paths worth a ``GET`` before the first request; each answer is
    given to ``learn`` (any status; a missing or failing probe changes nothing but the
    defaults). ``encode`` builds a request for images ``(N, C, H, W)`` float32;
    ``decode`` reads a 200 answer into an array (``read_outputs`` then reads it for the
    task); ``fall_back`` switches from binary to JSON after a refusal. Hints learnt
    from probes: ``max_batch``, ``max_body``, ``num_classes``.
    """

    max_batch: int | None = None
    max_body: int | None = None
    num_classes: int | None = None
    layout: str = "NCHW"
    notes: list[str] = field(default_factory=list)

    name = ""

    @property
    def encoding(self) -> str:
        """How tensors travel in the next request: ``"binary"`` or ``"json"``."""
        return "json"

    def probes(self) -> list[str]:
        return []

    def learn(self, path: str, status: int, headers: Mapping[str, str], raw: bytes) -> None:
        """Take what a probe's answer says (ignored unless it is a 200 JSON object)."""
        return None

    @property
    def tentative(self) -> bool:
        """Whether the next request tries an encoding the server has not confirmed (send it once,
        without retries, and :meth:`fall_back` if it fails)."""
        return False

    def fall_back(self, status: int, reason: str = "") -> bool:
        """After a refused request (``status``; 0: no answer, ``reason`` says why): switch
        encoding and return True to send it again."""
        return False

    def confirm(self) -> None:
        """The last request was answered: its encoding works."""
        return None

    @abstractmethod
    def encode(self, x: np.ndarray) -> Encoded: ...

    @abstractmethod
    def decode(self, headers: Mapping[str, str], raw: bytes, n: int, max_bytes: int) -> np.ndarray: ...

    def _probe_json(self, status: int, raw: bytes, what: str) -> dict[str, Any] | None:
        if status != 200:
            self.notes.append(f"{what}: HTTP {status} (ignored)")
            return None
        try:
            payload = parse_json(raw, what, len(raw) + 1)
        except ProtocolError as exc:
            self.notes.append(f"{what}: {exc} (ignored)")
            return None
        return payload if isinstance(payload, dict) else None


def _answer_list(raw: bytes, key: str, n: int, max_bytes: int) -> list:
    """The list ``key`` of a JSON answer object, one entry per image (``n``)."""
    payload = parse_json(raw, "answer", max_bytes)
    values = payload.get(key) if isinstance(payload, dict) else None
    if not isinstance(values, list):
        raise ProtocolError(f'no "{key}" list')
    if len(values) != n:
        raise ProtocolError(f"{len(values)} {key} for {n} images")
    return values


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else None


@dataclass
class NNMarkWire(Wire):
    """nnmark's ``POST /predict`` (JSON); ``GET /health`` (optional) gives limits and classes.

    ``want_scores``: read the answer's ``"probabilities"`` rows ``(N, K)`` when it has them (a server started
    with ``probabilities=True``), else its labels."""

    name = "nnmark"
    want_scores: bool = False

    def probes(self) -> list[str]:
        return ["/health"]

    def learn(self, path: str, status: int, headers: Mapping[str, str], raw: bytes) -> None:
        info = self._probe_json(status, raw, "GET /health")
        if info is None:
            return
        limits = info.get("limits") if isinstance(info.get("limits"), dict) else {}
        self.max_batch = _positive_int(limits.get("max_batch"))
        self.max_body = _positive_int(limits.get("max_body_bytes"))
        self.num_classes = _positive_int(info.get("num_classes"))

    def encode(self, x: np.ndarray) -> Encoded:
        # float64 text as before (servers size their body limits on it); json_array would be ~30% smaller
        body = _dumps({"images": x.tolist()})
        return Encoded("/predict", body, {"Content-Type": "application/json"})

    def decode(self, headers: Mapping[str, str], raw: bytes, n: int, max_bytes: int) -> np.ndarray:
        if self.want_scores:
            payload = parse_json(raw, "answer", max_bytes)
            if isinstance(payload, dict) and "probabilities" in payload:
                rows = _answer_list(raw, "probabilities", n, max_bytes)
                if not all(isinstance(r, list) and r and all(isinstance(v, int | float) and not isinstance(v, bool)
                                                             for v in r) for r in rows):
                    raise ProtocolError("probabilities are not rows of numbers")
                try:
                    return np.asarray(rows, dtype=np.float64).reshape(n, -1)
                except ValueError:
                    raise ProtocolError("probability rows differ in length") from None
        labels = _answer_list(raw, "labels", n, max_bytes)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
            raise ProtocolError("labels are not all integers")
        try:
            return np.asarray(labels, dtype=np.int64).reshape(n)
        except OverflowError:
            raise ProtocolError("a label is out of the 64-bit range") from None


def _model_path(prefix: str, model: str, version: str | None) -> str:
    path = f"{prefix}/models/{quote(model, safe='')}"
    return path + (f"/versions/{quote(version, safe='')}" if version else "")


@dataclass
class OIPWire(Wire):
    """Open Inference Protocol (KServe v2 REST) client side.

    ``model``: the model's name; ``version``: optional. ``binary``: ``True`` binary
    tensors, ``False`` JSON ``data``, ``None`` (default) binary when the server lists
    the extension or says nothing, JSON after a refusal. ``output``: which output to
    read (default: the first one the server answers).
    """

    model: str = ""
    version: str | None = None
    binary: bool | None = None
    output: str | None = None
    input: TensorSpec | None = None
    outputs: list[TensorSpec] = field(default_factory=list)
    server_binary: bool | None = None
    declared_inputs: int = 0

    name = "oip"

    def __post_init__(self) -> None:
        if not self.model:
            raise ProtocolError("the Open Inference Protocol needs the model's name (--model-name)")
        self._use_binary = self.binary is not False
        self._confirmed = self.binary is not None  # chosen by the caller: never switched

    @property
    def base(self) -> str:
        return _model_path("/v2", self.model, self.version)

    @property
    def encoding(self) -> str:
        return "binary" if self._use_binary else "json"

    def probes(self) -> list[str]:
        return [self.base, "/v2"]

    def learn(self, path: str, status: int, headers: Mapping[str, str], raw: bytes) -> None:
        info = self._probe_json(status, raw, f"GET {path}")
        if info is None:
            return
        if path == "/v2":
            ext = info.get("extensions")
            if isinstance(ext, list):
                self.server_binary = BINARY_EXTENSION in ext
                if self.binary is None:
                    self._use_binary = self._confirmed = self.server_binary
            return
        specs = [_tensor_spec(t) for t in info.get("inputs") or [] if isinstance(t, dict)]
        self.declared_inputs = len(specs)
        self.input = specs[0] if specs else None
        self.outputs = [_tensor_spec(t) for t in info.get("outputs") or [] if isinstance(t, dict)]
        if self.input is not None and self.input.shape and self.input.shape[0] > 0:
            self.max_batch = self.input.shape[0]  # a fixed batch dimension
        out = self._output_spec()
        if out is not None and out.shape and len(out.shape) == 2 and out.shape[1] >= 2:
            self.num_classes = out.shape[1]

    def _output_spec(self) -> TensorSpec | None:
        for spec in self.outputs:
            if self.output is None or spec.name == self.output:
                return spec
        return None

    def encode(self, x: np.ndarray) -> Encoded:
        if self.declared_inputs > 1:
            raise ProtocolError(f"model {self.model!r} declares {self.declared_inputs} inputs; nnmark sends one "
                                "image tensor")
        spec = self.input or TensorSpec("input")
        arr, self.layout = fit_input(x, spec.shape)
        if spec.datatype not in _FLOAT_DATATYPES:
            raise ProtocolError(f"the model's input datatype {spec.datatype} is not a float type")
        arr = arr.astype(OIP_DATATYPES[spec.datatype], copy=False)
        tensor: dict[str, Any] = {"name": spec.name, "shape": list(arr.shape), "datatype": spec.datatype}
        wanted = [self.output] if self.output else []
        if not self._use_binary:
            # the values are written as text in their shortest float32 form (json_array), not by json.dumps
            text = ('{"inputs":[' + json.dumps(tensor, separators=(",", ":"))[:-1] + ',"data":'
                    + json_array(np.ascontiguousarray(arr, dtype=np.float32).ravel()) + "}]"
                    + (',"outputs":' + json.dumps([{"name": o} for o in wanted]) if wanted else "") + "}")
            return Encoded(self.base + "/infer", text.encode(), {"Content-Type": "application/json"})
        raw = np.ascontiguousarray(arr).tobytes()
        tensor["parameters"] = {"binary_data_size": len(raw)}
        names = wanted or [s.name for s in self.outputs]
        header: dict[str, Any] = {"inputs": [tensor], "parameters": {"binary_data_output": True}}
        if names:
            header["outputs"] = [{"name": o, "parameters": {"binary_data": True}} for o in names]
        head = _dumps(header)
        return Encoded(self.base + "/infer", head + raw,
                       {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(head))}, binary=True)

    @property
    def tentative(self) -> bool:
        return self._use_binary and not self._confirmed

    def fall_back(self, status: int, reason: str = "") -> bool:
        # a server without the extension may answer 400/415/422, or fail (5xx) on the raw bytes
        if self.tentative and status not in (404, 413):
            self._use_binary, self._confirmed = False, True
            self.notes.append(f"binary tensors refused ({reason or f'HTTP {status}'}); JSON from now on")
            return True
        return False

    def confirm(self) -> None:
        self._confirmed = True

    def decode(self, headers: Mapping[str, str], raw: bytes, n: int, max_bytes: int) -> np.ndarray:
        head, binary = split_binary(raw, headers, max_bytes)
        payload = parse_json(head, "answer", max_bytes)
        if not isinstance(payload, dict):
            raise ProtocolError("answer is not a JSON object")
        outputs = decode_tensors(payload.get("outputs"), binary, "outputs")
        for name, arr in outputs:
            if self.output is None or name == self.output:
                return arr
        raise ProtocolError(f"no output {self.output!r}; answered {', '.join(name for name, _ in outputs)}")


def _tensor_spec(t: dict[str, Any]) -> TensorSpec:
    shape = t.get("shape")
    ok = isinstance(shape, list) and len(shape) <= MAX_DIMS and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= -1 for v in shape)
    dtype = t.get("datatype") if t.get("datatype") in OIP_DATATYPES else "FP32"
    return TensorSpec(str(t.get("name", "input")), dtype, list(shape) if ok else None)


@dataclass
class TFServingWire(Wire):
    """TensorFlow Serving's REST predict API (JSON only; ``instances`` / ``predictions``).

    ``model``: the model's name; ``version``: optional; ``output``: which named output to
    read when predictions are objects (default: the only one).
    """

    model: str = ""
    version: str | None = None
    output: str | None = None
    input_shape: list[int] | None = None

    name = "tfserving"

    def __post_init__(self) -> None:
        if not self.model:
            raise ProtocolError("TF-Serving needs the model's name (--model-name)")

    def probes(self) -> list[str]:
        return [f"/v1/models/{quote(self.model, safe='')}/metadata"]

    def learn(self, path: str, status: int, headers: Mapping[str, str], raw: bytes) -> None:
        info = self._probe_json(status, raw, f"GET {path}")
        try:
            sig = info["metadata"]["signature_def"]["signature_def"]["serving_default"]  # type: ignore[index]
            inputs = sig["inputs"]
        except (KeyError, TypeError):
            return
        if not isinstance(inputs, dict) or len(inputs) != 1:
            return
        dims = (next(iter(inputs.values())) or {}).get("tensor_shape", {}).get("dim")
        try:
            self.input_shape = [int(d.get("size", -1)) for d in dims]
        except (AttributeError, TypeError, ValueError):
            self.input_shape = None

    def encode(self, x: np.ndarray) -> Encoded:
        arr, self.layout = fit_input(x, self.input_shape)
        path = _model_path("/v1", self.model, self.version) + ":predict"
        return Encoded(path, ('{"instances":' + json_array(arr) + "}").encode(), {"Content-Type": "application/json"})

    def decode(self, headers: Mapping[str, str], raw: bytes, n: int, max_bytes: int) -> np.ndarray:
        preds = _answer_list(raw, "predictions", n, max_bytes)
        if preds and isinstance(preds[0], dict):
            keys = list(preds[0])
            key = self.output or (keys[0] if len(keys) == 1 else None)
            if key is None or not all(isinstance(p, dict) and key in p for p in preds):
                raise ProtocolError(f"predictions name several outputs ({', '.join(map(str, keys[:8]))}); "
                                    "choose one")
            preds = [p[key] for p in preds]
        try:
            arr = np.asarray(preds)
        except (ValueError, TypeError):
            raise ProtocolError("predictions are not a rectangular list of numbers") from None
        if arr.dtype.kind not in "biuf" or arr.size > MAX_ELEMENTS:
            raise ProtocolError("predictions are not numbers")
        return arr


def make_wire(protocol: str, model: str | None = None, version: str | None = None, *,
              binary: bool | None = None, output: str | None = None) -> Wire:
    """The client side of ``protocol`` (one of :data:`PROTOCOLS`)."""
    if protocol == "nnmark":
        return NNMarkWire()
    if protocol == "oip":
        return OIPWire(model=model or "", version=version, binary=binary, output=output)
    if protocol == "tfserving":
        if binary:
            raise ProtocolError("TF-Serving's REST API has no binary tensors; use JSON")
        return TFServingWire(model=model or "", version=version, output=output)
    raise ProtocolError(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")


def split_url_path(path: str) -> tuple[str, str | None, str | None]:
    """``(base path, model, version)`` from a URL path that names a model's endpoint.

    ``/v2/models/m[/versions/v][/infer]`` and ``/v1/models/m[/versions/v][:predict]`` give the
    model (and version) and the path before them; ``.../predict`` gives its prefix; any other
    path is a base path.
    """
    path = path.rstrip("/")
    for prefix in ("/v2/models/", "/v1/models/"):
        at = path.find(prefix)
        if at >= 0:
            rest = path[at + len(prefix):].split(":", 1)[0].split("/")
            model = unquote(rest[0]) if rest and rest[0] else None
            version = unquote(rest[2]) if len(rest) >= 3 and rest[1] == "versions" and rest[2] else None
            return path[:at], model, version
    if path.endswith("/predict"):
        path = path[: -len("/predict")]
    return path, None, None


# -- server side: the Open Inference Protocol -----------------------------------------

def oip_route(path: str) -> tuple[str, str | None, str | None] | None:
    """``(endpoint, model, version)`` for an OIP path, ``None`` for any other.

    Endpoints: ``server`` (``/v2``), ``live``, ``ready`` (``/v2/health/...``), ``model``,
    ``model-ready``, ``infer`` (``/v2/models/{name}[/versions/{v}][/ready|/infer]``).
    """
    parts = path.rstrip("/").split("/")[1:]
    if not parts or parts[0] != "v2":
        return None
    rest = parts[1:]
    if not rest:
        return ("server", None, None)
    if rest[0] == "health" and len(rest) == 2 and rest[1] in ("live", "ready"):
        return (rest[1], None, None)
    if rest[0] != "models" or len(rest) < 2 or not rest[1]:
        return None
    model, tail, version = unquote(rest[1]), rest[2:], None
    if len(tail) >= 2 and tail[0] == "versions":
        version, tail = unquote(tail[1]), tail[2:]
    if not tail:
        return ("model", model, version)
    if tail == ["ready"]:
        return ("model-ready", model, version)
    if tail == ["infer"]:
        return ("infer", model, version)
    return None


def oip_server_metadata(version: str) -> dict[str, Any]:
    """``GET /v2``: the server's name, version and extensions (binary tensors)."""
    return {"name": "nnmark", "version": version, "extensions": [BINARY_EXTENSION]}


def oip_model_metadata(name: str, input_spec: TensorSpec, output_spec: TensorSpec) -> dict[str, Any]:
    """``GET /v2/models/{name}``: one input and one output, ``-1`` for the batch."""
    return {"name": name, "versions": ["1"], "platform": "pytorch",
            "inputs": [{"name": input_spec.name, "datatype": input_spec.datatype, "shape": input_spec.shape}],
            "outputs": [{"name": output_spec.name, "datatype": output_spec.datatype, "shape": output_spec.shape}]}


@dataclass
class InferRequest:
    """A parsed OIP infer request: ``images`` float32 ``(N, C, H, W)``; how to answer."""

    images: np.ndarray
    request_id: str | None
    binary_output: bool


def parse_infer_request(body: bytes, headers: Mapping[str, str], *, input_name: str,
                        in_shape: tuple[int, int, int], max_batch: int, output_name: str) -> InferRequest:
    """An OIP infer request (JSON ``data`` or binary tensors) for a model with one image input.

    The input must be named ``input_name`` and shaped ``[N, C, H, W]`` (``[N, H, W]`` for one
    channel), ``N <= max_batch``, float or integer values, all finite. Binary outputs are
    asked for by ``parameters.binary_data_output`` or the output's ``parameters.binary_data``.
    Raises :class:`ProtocolError` (400; 413 for a batch over ``max_batch``).
    """
    c, h, w = in_shape
    head, binary = split_binary(body, headers, len(body))
    payload = parse_json(head, "request", len(head))
    if not isinstance(payload, dict) or not isinstance(payload.get("inputs"), list):
        raise ProtocolError('request must be a JSON object {"inputs": [...]}')
    inputs = payload["inputs"]
    if len(inputs) != 1:
        raise ProtocolError(f"the model has one input {input_name!r}; got {len(inputs)} inputs")
    spec = inputs[0]
    if not isinstance(spec, dict) or spec.get("name") != input_name:
        got = spec.get("name") if isinstance(spec, dict) else None
        raise ProtocolError(f"unknown input {_one_line(got, 40)!r}; the model's input is {input_name!r}")
    shape = spec.get("shape")
    if isinstance(shape, list) and shape and isinstance(shape[0], int) and shape[0] > max_batch:
        raise ProtocolError(f"batch of {shape[0]} images exceeds the limit of {max_batch}", 413)
    ((_, arr),) = decode_tensors(inputs, binary, "inputs", max_elements=max_batch * c * h * w)
    if arr.ndim == 3 and c == 1:
        arr = arr[:, None]
    if arr.shape[1:] != (c, h, w):
        raise ProtocolError(f"input has shape {list(arr.shape)}; expected [N, {c}, {h}, {w}]"
                            + (f" or [N, {h}, {w}]" if c == 1 else ""))
    if arr.dtype.kind not in "iuf":
        raise ProtocolError("input values must be numbers")
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise ProtocolError("input values must be finite")
    params = payload.get("parameters") if isinstance(payload.get("parameters"), dict) else {}
    want_binary = params.get("binary_data_output") is True
    for out in payload.get("outputs") or []:
        if not isinstance(out, dict) or out.get("name") != output_name:
            name = out.get("name") if isinstance(out, dict) else None
            raise ProtocolError(f"unknown output {_one_line(name, 40)!r}; the model's output is {output_name!r}")
        out_params = out.get("parameters") if isinstance(out.get("parameters"), dict) else {}
        want_binary = want_binary or out_params.get("binary_data") is True
    request_id = payload.get("id") if isinstance(payload.get("id"), str) else None
    return InferRequest(np.ascontiguousarray(arr), request_id, want_binary)


def encode_infer_response(model: str, output_name: str, values: np.ndarray, *, request_id: str | None,
                          binary: bool) -> tuple[bytes, dict[str, str]]:
    """An OIP infer answer with one output: ``(body, headers)`` (binary or JSON ``data``)."""
    datatype = {np.dtype(np.int64): "INT64", np.dtype(np.float32): "FP32"}.get(values.dtype)
    if datatype is None:
        values, datatype = values.astype(np.float32), "FP32"
    values = np.ascontiguousarray(values.astype(values.dtype.newbyteorder("<"), copy=False))
    out: dict[str, Any] = {"name": output_name, "datatype": datatype, "shape": list(values.shape)}
    payload: dict[str, Any] = {"model_name": model, "model_version": "1", "outputs": [out]}
    if request_id is not None:
        payload["id"] = request_id
    if not binary:
        out["data"] = values.ravel().tolist()
        return _dumps(payload), {"Content-Type": "application/json"}
    raw = values.tobytes()
    out["parameters"] = {"binary_data_size": len(raw)}
    head = _dumps(payload)
    return head + raw, {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(head))}
