"""The registry's errors and the records it returns (frozen dataclasses)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nnmark.errors import NNMarkError


class RegistryError(NNMarkError):
    """A registry operation cannot be done (unknown customer, reservation already settled, ...)."""


class RegistryNotFoundError(RegistryError):
    """The registry database (file) does not exist."""


class RegistryProductError(RegistryError):
    """The registry belongs to another product or base model."""


class RegistrySchemaError(RegistryError):
    """The database is not an nnmark registry, or has another schema version."""


@dataclass(frozen=True)
class ProductInfo:
    """The product a registry belongs to."""

    name: str
    base_sha256: str
    key_id: str
    code_family: dict[str, Any]
    created_at: float


@dataclass(frozen=True)
class Customer:
    """A registered customer and the code it holds (``None`` before its first issue)."""

    id: int
    name: str
    community: str | None
    community_code: str | None
    codebook: str | None
    code_index: int | None
    code_state: str | None


@dataclass(frozen=True)
class Reservation:
    """A code reserved for a customer, waiting for its model file (pass to :meth:`Registry.complete_issue`)."""

    token: str
    customer: str
    customer_id: int
    codebook: str
    code_index: int
    planned_path: str | None
    reserved_at: float


@dataclass(frozen=True)
class IssuedCopy:
    """A completed issue: a model file given to a customer."""

    token: str
    customer: str
    codebook: str
    code_index: int
    model_path: str
    model_sha256: str
    reserved_at: float
    completed_at: float
    note: str | None


@dataclass(frozen=True)
class RecoveryReport:
    """What :meth:`Registry.recover` did: tokens completed from their files, released, and skipped (alive)."""

    completed: tuple[str, ...]
    released: tuple[str, ...]
    skipped_alive: tuple[str, ...]


def database_url(url_or_path: str | os.PathLike) -> str:
    """A SQLAlchemy URL: returned as is if it has a scheme (``sqlite:///``, ``postgresql://``), else a file path
    turned into ``sqlite:///<absolute path>``."""
    text = os.fspath(url_or_path)
    if "://" in text:
        return text
    return "sqlite:///" + str(Path(text).expanduser().resolve())
