"""Safe model files: safetensors weights + JSON metadata, never unpickled.

A model file is a single ``.safetensors`` file whose header metadata carries one
key, ``"nnmark"``, holding JSON::

    {"format": "nnmark-model", "version": 1,
     "spec": {...architecture spec...}, "data": {...}, "training": {...}, ...}

Suspect model files come from adversaries, so :func:`load_model` treats the bytes
as hostile and spends memory only on what it has checked, in this order:

1. the file's size from ``stat`` (a regular file of at most :data:`MAX_FILE_BYTES`);
2. its first 8 bytes: pickle and ``torch.save`` archives are recognised and refused;
   the header length must be at most :data:`MAX_HEADER_BYTES` and fit in the file;
3. the header (JSON, read with :func:`nnmark.safejson.loads`: bounded depth): every
   tensor entry's dtype, shape and offsets, which must tile the data section
   exactly (a file whose size differs from what its header declares is refused
   here, before the data is read);
4. the nnmark metadata and its architecture spec (:func:`nnmark.models.validate_spec`:
   every dimension, the layer count, the parameter count and the activation size
   bounded by :class:`nnmark.models.SpecLimits`);
5. the header's tensor names, shapes and dtypes against the spec's network built
   on the ``meta`` device (no storage);
6. only then the tensor data (exactly the declared bytes, which the spec bounds),
   checked for NaN / infinity, and the real network.

Refusing a crafted file therefore reads at most 8 + :data:`MAX_HEADER_BYTES`
bytes and allocates nothing in proportion to what the file claims. Every problem
is a :class:`~nnmark.errors.ModelFileError` with a one-line message.
"""

from __future__ import annotations

import hashlib
import json
import math
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors.torch import save as st_save
from torch import nn

from nnmark.errors import ModelFileError
from nnmark.keyfile import write_private_file
from nnmark.models import SpecLimits, build_model, expected_state, validate_spec
from nnmark.safejson import JSONLimitError
from nnmark.safejson import loads as safe_loads

FORMAT = "nnmark-model"
VERSION = 1
MAX_FILE_BYTES = 4 << 30  # 4 GiB
# The header holds the tensor table (~100 bytes a tensor) and nnmark's metadata (a few KB).
MAX_HEADER_BYTES = 1 << 20  # 1 MiB
MAX_TENSORS = 4096
MAX_TENSOR_DIMS = 8

# safetensors dtype names -> (torch dtype, bytes per element)
_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2), "I64": (torch.int64, 8), "I32": (torch.int32, 4),
    "I16": (torch.int16, 2), "I8": (torch.int8, 1), "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
}
_NAMES = {dt: name for name, (dt, _) in _DTYPES.items()}


def save_model(path: str | Path, model: nn.Module, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``model``'s state dict and its spec (``model.spec``) to ``path``.

    ``metadata``: extra JSON-able information (data spec, training record, ...).
    The file is written atomically. Returns the path.
    """
    spec = getattr(model, "spec", None)
    if spec is None:
        raise ModelFileError("model has no .spec; build it with nnmark.models.build_model")
    meta = {"format": FORMAT, "version": VERSION, "spec": spec}
    meta.update(metadata or {})
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    blob = st_save(tensors, metadata={"nnmark": json.dumps(meta)})
    path = Path(path)
    write_private_file(path, blob)
    path.chmod(0o644)  # models are not secret
    return path


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header: dtype name, shape, byte range in the data section."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class ModelHeader:
    """What a model file declares, read without its tensor data.

    ``size``: file bytes; ``header_len``: JSON header bytes (after the 8-byte length);
    ``tensors``: entries by name; ``meta``: the parsed nnmark metadata record.
    """

    path: Path
    size: int
    header_len: int
    tensors: dict[str, TensorEntry]
    meta: dict[str, Any]

    @property
    def data_bytes(self) -> int:
        """Bytes of tensor data the header declares."""
        return max((e.end for e in self.tensors.values()), default=0)


def _check_magic(first: bytes, path: Path) -> None:
    if len(first) >= 9 and first[8:9] == b"{":
        return
    if first[:1] == b"\x80" or first[:2] in (b"(d", b"(l", b"}q", b"]q"):
        raise ModelFileError(
            f"{path} looks like a Python pickle; nnmark never unpickles model files "
            "(convert it to safetensors in a trusted environment)"
        )
    if first[:4] == b"PK\x03\x04":
        raise ModelFileError(
            f"{path} is a zip archive (torch.save format, which contains a pickle); "
            "nnmark only loads safetensors files"
        )


def _file_size(path: Path) -> int:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ModelFileError(f"model file not found: {path}") from None
    except OSError as exc:
        raise ModelFileError(f"cannot read model file {path}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ModelFileError(f"{path} is a directory, not a model file")
    if not stat.S_ISREG(st.st_mode):
        raise ModelFileError(f"{path} is not a regular file")
    if st.st_size > MAX_FILE_BYTES:
        raise ModelFileError(f"{path} is larger than {MAX_FILE_BYTES >> 30} GiB; refusing")
    return st.st_size


def _read_exact(fh: BinaryIO, n: int) -> bytes:
    data = fh.read(n)
    return data if data is not None else b""


def _parse_entries(header: dict[str, Any], path: Path) -> dict[str, TensorEntry]:
    if len(header) > MAX_TENSORS + 1:
        raise ModelFileError(f"{path} declares {len(header) - 1} tensors; at most {MAX_TENSORS} are allowed")
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        bad = ModelFileError(f"{path}: tensor {name[:80]!r} has a malformed entry")
        if not isinstance(info, dict):
            raise bad
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in _DTYPES or not isinstance(shape, list) or len(shape) > MAX_TENSOR_DIMS:
            raise bad
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in shape):
            raise bad
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in offsets)):
            raise bad
        start, end = offsets
        if not 0 <= start <= end or end - start != math.prod(shape) * _DTYPES[dtype][1]:
            raise ModelFileError(f"{path}: tensor {name[:80]!r} has offsets that do not fit its shape")
        entries[name] = TensorEntry(dtype, tuple(shape), start, end)
    pos = 0
    for e in sorted(entries.values(), key=lambda e: (e.start, e.end)):
        if e.start != pos:
            raise ModelFileError(f"{path}: tensor data has gaps or overlaps (not a valid safetensors file)")
        pos = e.end
    return entries


def _read_header(fh: BinaryIO, size: int, path: Path) -> ModelHeader:
    first = _read_exact(fh, 9)
    _check_magic(first, path)
    if size < 8 or len(first) < 8:
        raise ModelFileError(f"{path} is truncated or empty ({size} bytes)")
    (hlen,) = struct.unpack("<Q", first[:8])
    if hlen > MAX_HEADER_BYTES:
        raise ModelFileError(f"{path} is not a safetensors file nnmark can read (header of {hlen} bytes; "
                             f"at most {MAX_HEADER_BYTES} are allowed)")
    if 8 + hlen > size:
        raise ModelFileError(f"{path} is truncated (header needs {hlen} bytes, the file has {size - 8} after "
                             "its length)")
    fh.seek(8)
    raw = _read_exact(fh, hlen)
    if len(raw) != hlen:
        raise ModelFileError(f"{path} is truncated (header needs {hlen} bytes)")
    try:
        header = safe_loads(raw, max_bytes=MAX_HEADER_BYTES, what="header")
    except JSONLimitError as exc:
        if "nested deeper" in str(exc) or "larger than" in str(exc):
            raise ModelFileError(f"{path} is not a safetensors file nnmark can read ({exc})") from None
        raise ModelFileError(f"{path} is not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{path} is not a safetensors file (bad header)")
    entries = _parse_entries(header, path)
    end = max((e.end for e in entries.values()), default=0)
    body = size - 8 - hlen
    if body < end:
        raise ModelFileError(f"{path} is truncated: {end} bytes of tensor data expected, {body} present")
    if body > end:
        raise ModelFileError(f"{path} has {body - end} bytes after its tensor data (not a valid safetensors file)")
    header_meta = header.get("__metadata__") or {}
    if not isinstance(header_meta, dict):
        raise ModelFileError(f"{path} is not a safetensors file (bad metadata)")
    text = header_meta.get("nnmark")
    if text is None:
        raise ModelFileError(f"{path} has no nnmark metadata (architecture spec); save it with nnmark")
    if not isinstance(text, str):
        raise ModelFileError(f"{path}: nnmark metadata is not valid JSON")
    try:
        meta = safe_loads(text, max_bytes=MAX_HEADER_BYTES, what="nnmark metadata")
    except JSONLimitError as exc:
        raise ModelFileError(f"{path}: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelFileError(f"{path}: metadata is not an nnmark model record")
    return ModelHeader(path, size, hlen, entries, meta)


def read_header(path: str | Path) -> ModelHeader:
    """Check a model file's container and read its header and nnmark metadata, not its tensor data.

    Reads at most ``8 + MAX_HEADER_BYTES`` bytes. Raises :class:`ModelFileError`.
    """
    path = Path(path)
    size = _file_size(path)
    with path.open("rb") as fh:
        return _read_header(fh, size, path)


def _match_spec(head: ModelHeader, spec: dict[str, Any]) -> None:
    """The header's tensors must be exactly the spec's state dict (names, shapes, dtypes)."""
    path, tensors = head.path, head.tensors
    state = expected_state(spec)
    missing = [k for k in state if k not in tensors]
    unexpected = [k for k in tensors if k not in state]
    shape_bad = [k for k in state if k in tensors and tensors[k].shape != state[k][0]]
    if missing or unexpected or shape_bad:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"unexpected {', '.join(n[:80] for n in unexpected[:3])}")
        for k in shape_bad[:3]:
            parts.append(f"{k} has shape {tensors[k].shape}, spec needs {state[k][0]}")
        raise ModelFileError(f"{path}: tensors do not match architecture {spec['arch']!r}: " + "; ".join(parts))
    for k, (_, dtype) in state.items():
        if _DTYPES[tensors[k].dtype][0] != dtype:
            raise ModelFileError(f"{path}: tensor {k} has dtype {_DTYPES[tensors[k].dtype][0]}, expected {dtype}")


def _read_tensors(fh: BinaryIO, head: ModelHeader) -> dict[str, torch.Tensor]:
    """Read exactly the declared data section into one buffer; tensors are views of it."""
    n = head.data_bytes
    buf = bytearray(n)
    view = memoryview(buf)
    fh.seek(8 + head.header_len)
    got = 0
    while got < n:
        k = fh.readinto(view[got:])
        if not k:
            raise ModelFileError(f"{head.path} is truncated: {n} bytes of tensor data expected, {got} present")
        got += k
    out: dict[str, torch.Tensor] = {}
    for name, e in head.tensors.items():
        dtype, itemsize = _DTYPES[e.dtype]
        count = math.prod(e.shape)
        if count == 0:
            out[name] = torch.empty(e.shape, dtype=dtype)
            continue
        t = torch.frombuffer(buf, dtype=dtype, count=count, offset=e.start).reshape(e.shape)
        out[name] = t.clone() if e.start % itemsize else t  # keep every tensor aligned
    return out


def _check_values(tensors: dict[str, torch.Tensor], path: Path) -> None:
    for k, v in tensors.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise ModelFileError(f"{path}: tensor {k} contains NaN or infinite values")


def read_model_file(path: str | Path, expect_spec: dict[str, Any] | None = None,
                    limits: SpecLimits | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Parse a model file into (state dict, nnmark metadata) without building a model.

    Everything but the tensor data is checked first (see the module docstring):
    the header, the spec against ``limits`` (default
    :data:`nnmark.models.DEFAULT_LIMITS`), ``expect_spec`` when given (e.g. from a
    key file: the file's architecture must match it), and the declared tensors
    against the spec. ``meta["spec"]`` is the validated, complete spec.
    """
    path = Path(path)
    size = _file_size(path)
    with path.open("rb") as fh:
        head = _read_header(fh, size, path)
        spec = validate_spec(head.meta.get("spec"), limits)
        if expect_spec is not None:
            diff = spec_difference(spec, expect_spec)
            if diff:
                raise ModelFileError(f"{path}: wrong architecture for this key ({diff})")
        _match_spec(head, spec)
        tensors = _read_tensors(fh, head)
    _check_values(tensors, path)
    meta = dict(head.meta)
    meta["spec"] = spec
    return tensors, meta


def load_model(path: str | Path, expect_spec: dict[str, Any] | None = None,
               limits: SpecLimits | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Load a model file safely; return ``(model in eval mode, metadata)``.

    ``expect_spec``: when given (e.g. from a key file), the file's architecture must
    match it, otherwise a :class:`ModelFileError` names the difference.
    ``limits``: bounds on the file's spec (default
    :data:`nnmark.models.DEFAULT_LIMITS`: 100 M parameters, 16 M activation
    values per input, 64 layers, ...); a trusted caller may pass larger ones.
    """
    path = Path(path)
    tensors, meta = read_model_file(path, expect_spec=expect_spec, limits=limits)
    model = build_model(meta["spec"])
    model.load_state_dict(tensors, strict=True)
    model.eval()
    return model, meta


def spec_difference(a: dict[str, Any], b: dict[str, Any]) -> str:
    """Empty string when two specs describe the same network, else a short description."""
    keys = sorted(set(a) | set(b))
    diffs = [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]
    return "; ".join(diffs[:3])
