"""Bounded readers for suspect weight files: safetensors and ``torch.save`` archives.

Suspect files are hostile. These readers never unpickle arbitrary objects and
never read more than the file says it holds:

- safetensors: the 8-byte header length is checked against :data:`MAX_HEADER_BYTES`
  and against the file size *before* the header is read; every tensor's dtype,
  shape and byte range are checked against the body size; only then are the
  tensors read, through ``safetensors.safe_open`` (memory-mapped, one at a time).
- ``.pt`` / ``.pth``: only ``torch.load(path, weights_only=True, map_location="cpu")``
  (PyTorch's restricted unpickler: tensors, containers and primitive values only),
  and the result must be a flat mapping of names to tensors (the packed
  ``(weight, bias)`` pairs and dtype entries of PyTorch's quantised Linear layers
  are the only other values accepted).

Every problem is a :class:`~nnmark.targets.base.TargetError` with a one-line message.
"""

from __future__ import annotations

import json
import math
import pickle
import struct
from pathlib import Path
from typing import Any

import torch

from nnmark.targets.base import TargetError, one_line

MAX_FILE_BYTES = 4 << 30  # 4 GiB
MAX_HEADER_BYTES = 100 << 20  # 100 MiB of JSON header
PACKED_SUFFIX = "._packed_params._packed_params"
PACKED_DTYPE_SUFFIX = "._packed_params.dtype"

# bytes per element of the safetensors dtypes nnmark reads
_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


def file_size(path: Path, limit: int = MAX_FILE_BYTES) -> int:
    """Size of the regular file ``path`` in bytes, refusing missing files, directories and files over ``limit``."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise TargetError(f"model file not found: {path}") from None
    except OSError as exc:
        raise TargetError(f"cannot read {path}: {one_line(exc)}") from None
    if path.is_dir():
        raise TargetError(f"{path} is a directory, not a model file")
    if st.st_size > limit:
        raise TargetError(f"{path} is larger than {limit >> 20} MiB; refusing")
    return int(st.st_size)


def read_safetensors_header(path: str | Path) -> dict[str, Any]:
    """The checked JSON header of a safetensors file (tensor entries and ``__metadata__``)."""
    path = Path(path)
    size = file_size(path)
    with path.open("rb") as fh:
        first = fh.read(8)
        if len(first) < 8:
            raise TargetError(f"{path} is truncated or empty ({size} bytes)")
        (hlen,) = struct.unpack("<Q", first)
        if hlen > MAX_HEADER_BYTES:
            raise TargetError(f"{path}: safetensors header of {hlen} bytes is over the {MAX_HEADER_BYTES >> 20} MiB "
                              "limit; refusing")
        if 8 + hlen > size:
            raise TargetError(f"{path}: safetensors header claims {hlen} bytes but the file has {size}; refusing")
        text = fh.read(hlen)
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise TargetError(f"{path} is not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise TargetError(f"{path} is not a safetensors file (header is not an object)")
    body = size - 8 - hlen
    for name, info in header.items():
        if name == "__metadata__":
            if info is not None and not (isinstance(info, dict) and all(isinstance(v, str) for v in info.values())):
                raise TargetError(f"{path}: safetensors metadata must map names to strings")
            continue
        _check_entry(path, name, info, body)
    return header


def _check_entry(path: Path, name: str, info: Any, body: int) -> None:
    try:
        dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
    except (KeyError, TypeError, ValueError):
        raise TargetError(f"{path}: tensor {name!r} has a malformed header entry") from None
    if dtype not in _ST_ITEMSIZE:
        raise TargetError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise TargetError(f"{path}: tensor {name!r} has a malformed shape")
    if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= body):
        raise TargetError(f"{path} is truncated or corrupt: tensor {name!r} lies outside the file's {body} data bytes")
    if math.prod(shape) * _ST_ITEMSIZE[dtype] != end - begin:
        raise TargetError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {shape} {dtype}")


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file, after :func:`read_safetensors_header`'s checks."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    header = read_safetensors_header(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise TargetError(f"{path} is corrupt: {one_line(exc)}") from None
    return tensors, dict(header.get("__metadata__") or {})


def read_torch_weights(path: str | Path) -> dict[str, Any]:
    """A flat ``name -> tensor`` mapping from a ``torch.save`` file, loaded with ``weights_only=True`` only."""
    path = Path(path)
    file_size(path)
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise TargetError(f"{path} was refused by torch.load(weights_only=True) (it holds more than "
                          f"tensors: {one_line(exc)[:160]})") from None
    except Exception as exc:
        raise TargetError(f"{path} is not a readable torch weights file: {type(exc).__name__}: "
                          f"{one_line(exc)[:160]}") from None
    if not isinstance(obj, dict):
        raise TargetError(f"{path} holds a {type(obj).__name__}, not a state dict (a mapping of names to tensors)")
    for key, value in obj.items():
        if not isinstance(key, str):
            raise TargetError(f"{path}: state dict key {key!r} is not a string")
        if isinstance(value, torch.Tensor):
            continue
        if key.endswith(PACKED_SUFFIX) and _is_packed_pair(value):
            continue
        if key.endswith(PACKED_DTYPE_SUFFIX) and isinstance(value, torch.dtype):
            continue
        raise TargetError(f"{path} is not a flat state dict: {key!r} holds a {type(value).__name__}, not a tensor")
    return obj


def _is_packed_pair(value: Any) -> bool:
    return (isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], torch.Tensor)
            and (value[1] is None or isinstance(value[1], torch.Tensor)))
