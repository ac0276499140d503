"""Key files: the owner's secret plus everything needed to rebuild a scheme.

A key file is JSON::

    {"format": "nnmark-key", "version": 1, "key_id": "...", "secret": "<64 hex>",
     "scheme": "trigger", "params": {...}, "material": "<base64 safetensors>"}

``material`` holds secret tensors the scheme cannot re-derive from the key alone
(trigger images cut from the owner's data, a trained extractor network, ...).
It is stored in the safetensors format, so reading a key file never unpickles.

Files are created with mode 0600 (owner read/write only) through a temporary file
and an atomic rename, so a crash never leaves a half-written key. The secret is
never printed or logged.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from nnmark.errors import KeyFileError
from nnmark.keys import Key
from nnmark.safejson import JSONLimitError
from nnmark.safejson import loads as safe_json_loads

FORMAT = "nnmark-key"
VERSION = 1
MAX_KEY_FILE_BYTES = 256 << 20  # key material (trigger images, secret networks) is at most a few MB


@dataclass
class KeyFile:
    """The parsed contents of a key file."""

    key: Key
    scheme: str
    params: dict[str, Any] = field(default_factory=dict)
    material: dict[str, torch.Tensor] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"KeyFile(scheme={self.scheme!r}, key={self.key!r}, params={self.params!r})"


def write_atomically(path: str | Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` with permission ``mode``, atomically (temp file in the same folder, fsync,
    rename): a crash never leaves a half-written file, and the mode is set before any byte is written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".nnmark-", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        os.chmod(path, mode)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_private_file(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600 (secrets), atomically."""
    write_atomically(path, data, 0o600)


def save_key_file(path: str | Path, kf: KeyFile) -> None:
    """Write ``kf`` to ``path`` (mode 0600)."""
    blob = ""
    if kf.material:
        tensors = {k: v.detach().cpu().contiguous() for k, v in kf.material.items()}
        blob = base64.b64encode(st_save(tensors)).decode("ascii")
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "key_id": kf.key.key_id,
        "secret": kf.key.to_hex(),
        "scheme": kf.scheme,
        "params": kf.params,
        "material": blob,
    }
    write_private_file(path, json.dumps(doc, indent=1).encode())


def load_key_file(path: str | Path, expect_scheme: str | None = None) -> KeyFile:
    """Read a key file; raise :class:`KeyFileError` with a one-line reason if it is
    missing, malformed, or (when ``expect_scheme`` is given) made for another scheme."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_KEY_FILE_BYTES + 1)  # bounded: never more than the limit
    except FileNotFoundError:
        raise KeyFileError(f"key file not found: {path}") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from None
    try:
        doc = safe_json_loads(raw, max_bytes=MAX_KEY_FILE_BYTES, what="key file")
    except JSONLimitError as exc:
        if "not valid" in str(exc):
            raise KeyFileError(f"{path} is not an nnmark key file (not JSON)") from None
        raise KeyFileError(f"{path}: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise KeyFileError(f"{path} is not an nnmark key file (format field missing)")
    if doc.get("version") != VERSION:
        raise KeyFileError(f"{path}: unsupported key file version {doc.get('version')!r}")
    try:
        key = Key.from_hex(str(doc["secret"]))
    except (KeyError, ValueError):
        raise KeyFileError(f"{path}: the secret is missing or malformed") from None
    if doc.get("key_id") not in (None, key.key_id):
        raise KeyFileError(f"{path}: the key id does not match the secret (file altered?)")
    scheme = str(doc.get("scheme", ""))
    if expect_scheme is not None and not _scheme_matches(scheme, expect_scheme):
        raise KeyFileError(
            f"{path} is a key for scheme {scheme!r}, not for {expect_scheme!r}"
        )
    material: dict[str, torch.Tensor] = {}
    if doc.get("material"):
        try:
            material = dict(st_load(base64.b64decode(doc["material"])))
        except Exception:
            raise KeyFileError(f"{path}: the key material is corrupt") from None
    params = doc.get("params") or {}
    if not isinstance(params, dict):
        raise KeyFileError(f"{path}: params must be a JSON object")
    return KeyFile(key=key, scheme=scheme, params=params, material=material)


def _scheme_matches(found: str, expected: str) -> bool:
    return found == expected or found.split("-")[0] == expected.split("-")[0]
