"""A content-addressed artifact store: the same recipe is built once, by one process.

An artifact (a trained host, a marked model with its key) is named by the SHA-256 of the canonical JSON
of its *recipe* -- every input that determines it: dataset and its parameters, architecture, training
settings, scheme and parameters, seed, nnmark's version. Layout under ``root``::

    models/<h[:2]>/<h>.safetensors    the state dict (safetensors: tensors only, nothing is unpickled)
    models/<h[:2]>/<h>.json           the recipe and what was measured while building it; written last,
                                      so its presence marks a complete artifact
    keys/<h>.key                      a scheme's key file (mode 0600) and its commitment record / log
    locks/<h>.lock                    an flock held while one process builds the artifact

Every file is written atomically (temp file, fsync, rename): a process killed at any point leaves either
nothing or a complete artifact, never a half-written one. :meth:`ArtifactStore.build_once` takes the
artifact's lock, looks again, and builds only if it is still missing, so concurrent workers that need the
same host wait for the first one instead of training it twice.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from nnmark.harness.claims import exclusive
from nnmark.harness.config import canonical_json, content_hash
from nnmark.keyfile import write_atomically

MAX_ARTIFACT_BYTES = 2_000_000_000


class ArtifactStore:
    """Artifacts under ``root`` addressed by the hash of their recipe (see the module docs)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.hits = 0
        self.builds = 0

    # -- addressing ------------------------------------------------------------------------------------
    @staticmethod
    def address(recipe: dict[str, Any]) -> str:
        """The artifact's name: SHA-256 hex of the recipe's canonical JSON."""
        return content_hash(recipe)

    def _base(self, h: str) -> Path:
        return self.root / "models" / h[:2] / h

    def model_path(self, recipe: dict[str, Any]) -> Path:
        return self._base(self.address(recipe)).with_suffix(".safetensors")

    def meta_path(self, recipe: dict[str, Any]) -> Path:
        return self._base(self.address(recipe)).with_suffix(".json")

    def key_path(self, recipe: dict[str, Any]) -> Path:
        """Where the artifact's scheme key file goes (``<h>.key``, mode 0600)."""
        return self.root / "keys" / f"{self.address(recipe)}.key"

    def commitment_log(self, recipe: dict[str, Any]) -> Path:
        """The commitment log of the artifact's key (one per artifact, so workers never share a database)."""
        return self.root / "keys" / f"{self.address(recipe)}.commitments.db"

    def has(self, recipe: dict[str, Any]) -> bool:
        """Whether the artifact is complete (its JSON record, written last, exists)."""
        return self.meta_path(recipe).is_file()

    # -- reading and writing ---------------------------------------------------------------------------
    def put(self, recipe: dict[str, Any], model: torch.nn.Module, info: dict[str, Any] | None = None) -> None:
        """Store ``model``'s state dict and ``{recipe, info}`` (the JSON record last), atomically. The store's
        root gets a ``.gitignore`` of ``*``: it holds secret key files that must never be committed."""
        ignore = self.root / ".gitignore"
        if not ignore.exists():
            write_atomically(ignore, b"# nnmark artifact store: models and SECRET key files; never commit\n*\n", 0o644)
        tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        write_atomically(self.model_path(recipe), st_save(tensors), 0o644)
        record = {"recipe": recipe, "address": self.address(recipe), "info": info or {}}
        write_atomically(self.meta_path(recipe), (canonical_json(record) + "\n").encode(), 0o644)

    def state(self, recipe: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The stored state dict of a complete artifact (``KeyError`` if there is none)."""
        if not self.has(recipe):
            raise KeyError(f"no artifact {self.address(recipe)}")
        path = self.model_path(recipe)
        if path.stat().st_size > MAX_ARTIFACT_BYTES:
            raise ValueError(f"{path}: larger than {MAX_ARTIFACT_BYTES} bytes")
        return st_load(path.read_bytes())

    def info(self, recipe: dict[str, Any]) -> dict[str, Any]:
        """What was recorded when the artifact was built."""
        return json.loads(self.meta_path(recipe).read_text())["info"]

    @contextlib.contextmanager
    def lock(self, recipe: dict[str, Any]) -> Iterator[None]:
        """An exclusive lock on the artifact (``flock``; released when the holder exits, even killed)."""
        with exclusive(self.root / "locks" / f"{self.address(recipe)}.lock"):
            yield

    def build_once(self, recipe: dict[str, Any], build: Callable[[], tuple[torch.nn.Module, dict[str, Any]]]) -> bool:
        """Make sure the artifact exists: ``build()`` -> ``(model, info)`` runs only when it is missing (under
        the artifact's lock). Returns ``True`` for a cache hit, ``False`` when this call built it."""
        if self.has(recipe):
            self.hits += 1
            return True
        with self.lock(recipe):
            if self.has(recipe):
                self.hits += 1
                return True
            model, info = build()
            self.put(recipe, model, info)
            self.builds += 1
            return False
