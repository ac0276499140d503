"""Resumable training state: one safetensors file of tensors plus one JSON file per party and round.

A party's state is a flat ``{name: tensor}`` (its part, defenders, optimiser moments, RNG states as uint8)
plus JSON-able scalars (round, optimiser hyper-parameters). :func:`save_state` writes
``<dir>/<party>.r<round>.safetensors`` and ``.json``, each through a temporary file renamed into place
(``os.replace``: a reader sees the old file or the new one, never half of one). The run's manifest
``<dir>/manifest.json`` names the last round every party has saved; it is written last, atomically, by the
coordinator, so a party killed while saving leaves the manifest at the previous complete round. Files of
older rounds are removed once a newer manifest is in place (:func:`prune`).
Nothing is unpickled: tensors come back through ``safetensors``, scalars through bounded JSON.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from nnmark.safejson import loads as safe_json_loads
from nnmark.split.partition import SplitError

MANIFEST = "manifest.json"
MAX_JSON_BYTES = 1 << 20


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def flatten_optimizer(opt: torch.optim.Optimizer, prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Put an optimiser's tensor state into ``tensors`` (names ``<prefix>.<param>.<field>``); return the rest
    (its param groups and non-tensor state) as JSON-able data."""
    sd = opt.state_dict()
    scalars: dict[str, Any] = {}
    for idx, st in sd["state"].items():
        for field, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{prefix}.{idx}.{field}"] = v.detach().clone().contiguous()
            else:
                scalars[f"{idx}.{field}"] = v
    return {"param_groups": sd["param_groups"], "scalars": scalars}


def restore_optimizer(opt: torch.optim.Optimizer, prefix: str, tensors: dict[str, torch.Tensor],
                      meta: dict[str, Any]) -> None:
    """Inverse of :func:`flatten_optimizer`."""
    state: dict[int, dict[str, Any]] = {}
    for name, v in tensors.items():
        if name.startswith(prefix + "."):
            idx, field = name[len(prefix) + 1:].split(".", 1)
            state.setdefault(int(idx), {})[field] = v
    for key, v in meta.get("scalars", {}).items():
        idx, field = key.split(".", 1)
        state.setdefault(int(idx), {})[field] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_state(directory: str | Path, party: str, round_: int, tensors: dict[str, torch.Tensor],
               meta: dict[str, Any]) -> Path:
    """Write one party's state for ``round_`` (module doc); returns the safetensors path."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    st, js = d / f"{party}.r{round_}.safetensors", d / f"{party}.r{round_}.json"
    from safetensors.torch import save

    _atomic_write_bytes(st, save({k: v.detach().contiguous() for k, v in tensors.items()}))
    _atomic_write_bytes(js, json.dumps({"round": round_, **meta}).encode())
    return st


def load_state(directory: str | Path, party: str, round_: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read one party's state for ``round_``; :class:`SplitError` when it is missing."""
    d = Path(directory)
    st, js = d / f"{party}.r{round_}.safetensors", d / f"{party}.r{round_}.json"
    if not st.is_file() or not js.is_file():
        raise SplitError(f"no checkpoint of {party} for round {round_} in {directory}")
    if js.stat().st_size > MAX_JSON_BYTES:
        raise SplitError(f"checkpoint metadata {js} is too large")
    meta = safe_json_loads(js.read_text())
    if meta.get("round") != round_:
        raise SplitError(f"checkpoint {js} is for round {meta.get('round')}, expected {round_}")
    return load_file(str(st)), meta


def write_manifest(directory: str | Path, round_: int, info: dict[str, Any]) -> None:
    """Record that every party has saved ``round_`` (written last, atomically)."""
    _atomic_write_bytes(Path(directory) / MANIFEST, json.dumps({"round": round_, **info}).encode())


def read_manifest(directory: str | Path) -> dict[str, Any] | None:
    """The manifest (``{"round": r, ...}``), or ``None`` when no round was completed."""
    p = Path(directory) / MANIFEST
    if not p.is_file():
        return None
    if p.stat().st_size > MAX_JSON_BYTES:
        raise SplitError(f"{p} is too large")
    return safe_json_loads(p.read_text())


def prune(directory: str | Path, keep_round: int) -> None:
    """Remove party files of rounds other than ``keep_round``."""
    for p in Path(directory).glob("*.r*.*"):
        stem = p.name.split(".r", 1)[-1].split(".", 1)[0]
        if stem.isdigit() and int(stem) != keep_round:
            p.unlink(missing_ok=True)


__all__ = ["save_state", "load_state", "write_manifest", "read_manifest", "prune", "flatten_optimizer",
           "restore_optimizer"]
