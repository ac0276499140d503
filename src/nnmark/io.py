"""Safe model files: safetensors weights + JSON metadata, never unpickled.

A model file is a single ``.safetensors`` file whose header metadata carries one
key, ``"nnmark"``, holding JSON::

    {"format": "nnmark-model", "version": 1,
     "spec": {...architecture spec...}, "data": {...}, "training": {...}, ...}

Suspect model files come from adversaries, so :func:`load_model` treats the bytes
as hostile: it recognises pickle / ``torch.save`` archives and refuses them,
checks the safetensors header against the file size before parsing tensors,
validates the architecture spec, and reports the first mismatches between the
file's tensors and the spec's network. Every problem is a
:class:`~nnmark.errors.ModelFileError` with a one-line message.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from nnmark.errors import ModelFileError
from nnmark.keyfile import write_private_file
from nnmark.models import build_model, validate_spec

FORMAT = "nnmark-model"
VERSION = 1
MAX_FILE_BYTES = 4 << 30  # 4 GiB
MAX_HEADER_BYTES = 100 << 20


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


def _check_container(raw: bytes, path: Path) -> None:
    looks_safetensors = len(raw) >= 9 and raw[8:9] == b"{"
    if not looks_safetensors:
        if raw[:1] == b"\x80" or raw[:2] in (b"(d", b"(l", b"}q", b"]q"):
            raise ModelFileError(
                f"{path} looks like a Python pickle; nnmark never unpickles model files "
                "(convert it to safetensors in a trusted environment)"
            )
        if raw[:4] == b"PK\x03\x04":
            raise ModelFileError(
                f"{path} is a zip archive (torch.save format, which contains a pickle); "
                "nnmark only loads safetensors files"
            )
    if len(raw) < 8:
        raise ModelFileError(f"{path} is truncated or empty ({len(raw)} bytes)")
    (hlen,) = struct.unpack("<Q", raw[:8])
    if hlen > MAX_HEADER_BYTES:
        raise ModelFileError(f"{path} is not a safetensors file (implausible header size)")
    if 8 + hlen > len(raw):
        raise ModelFileError(f"{path} is truncated (header needs {hlen} bytes)")
    try:
        header = json.loads(raw[8 : 8 + hlen])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelFileError(f"{path} is not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{path} is not a safetensors file (bad header)")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, ValueError, IndexError):
            raise ModelFileError(f"{path}: tensor {name!r} has a malformed entry") from None
    body = len(raw) - 8 - hlen
    if body < end:
        raise ModelFileError(f"{path} is truncated: {end} bytes of tensor data expected, {body} present")


def read_model_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Parse a model file into (state dict, nnmark metadata) without building a model."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ModelFileError(f"model file not found: {path}") from None
    if path.is_dir():
        raise ModelFileError(f"{path} is a directory, not a model file")
    if size > MAX_FILE_BYTES:
        raise ModelFileError(f"{path} is larger than {MAX_FILE_BYTES >> 30} GiB; refusing")
    raw = path.read_bytes()
    _check_container(raw, path)
    try:
        tensors = st_load(raw)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise ModelFileError(f"{path} is corrupt: {str(exc).splitlines()[0]}") from None
    (hlen,) = struct.unpack("<Q", raw[:8])
    header_meta = json.loads(raw[8 : 8 + hlen]).get("__metadata__") or {}
    text = header_meta.get("nnmark")
    if text is None:
        raise ModelFileError(f"{path} has no nnmark metadata (architecture spec); save it with nnmark")
    try:
        meta = json.loads(text)
    except json.JSONDecodeError:
        raise ModelFileError(f"{path}: nnmark metadata is not valid JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelFileError(f"{path}: metadata is not an nnmark model record")
    return tensors, meta


def load_model(path: str | Path, expect_spec: dict[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Load a model file safely; return ``(model in eval mode, metadata)``.

    ``expect_spec``: when given (e.g. from a key file), the file's architecture must
    match it, otherwise a :class:`ModelFileError` names the difference.
    """
    tensors, meta = read_model_file(path)
    spec = validate_spec(meta.get("spec"))
    if expect_spec is not None:
        diff = spec_difference(spec, expect_spec)
        if diff:
            raise ModelFileError(f"{path}: wrong architecture for this key ({diff})")
    model = build_model(spec)
    state = model.state_dict()
    missing = [k for k in state if k not in tensors]
    unexpected = [k for k in tensors if k not in state]
    shape_bad = [k for k in state if k in tensors and tuple(tensors[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shape_bad:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:3])}")
        for k in shape_bad[:3]:
            parts.append(f"{k} has shape {tuple(tensors[k].shape)}, spec needs {tuple(state[k].shape)}")
        raise ModelFileError(f"{path}: tensors do not match architecture {spec['arch']!r}: " + "; ".join(parts))
    for k, v in tensors.items():
        if v.dtype != state[k].dtype:
            raise ModelFileError(f"{path}: tensor {k} has dtype {v.dtype}, expected {state[k].dtype}")
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise ModelFileError(f"{path}: tensor {k} contains NaN or infinite values")
    model.load_state_dict(tensors, strict=True)
    model.eval()
    return model, meta


def spec_difference(a: dict[str, Any], b: dict[str, Any]) -> str:
    """Empty string when two specs describe the same network, else a short description."""
    keys = sorted(set(a) | set(b))
    diffs = [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]
    return "; ".join(diffs[:3])
