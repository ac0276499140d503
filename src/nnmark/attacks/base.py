"""The attack protocol and the registry of attacks by name."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from torch import nn

from nnmark.data.dataset import ImageDataset

ATTACKS: dict[str, tuple[type[Attack], dict[str, Any]]] = {}


class Attack(ABC):
    """A removal attack: ``attack(model, data) -> attacked copy``.

    ``data`` is the attacker's own labelled data (disjoint from the owner's
    training set); attacks that need none ignore it.
    """

    name: ClassVar[str] = ""

    @abstractmethod
    def attack(self, model: nn.Module, data: ImageDataset | None = None) -> nn.Module:
        """Return an attacked copy of ``model`` (``model`` itself is left untouched)."""

    def describe(self) -> dict[str, Any]:
        """Name and parameters, JSON-able."""
        return {"attack": self.name, **{k: v for k, v in vars(self).items() if not k.startswith("_")}}


def register_attack(name: str, cls: type[Attack], **defaults: Any) -> None:
    """Register ``cls`` under ``name`` with default constructor arguments."""
    ATTACKS[name] = (cls, defaults)


def build_attack(name: str, **params: Any) -> Attack:
    """Build a registered attack; ``params`` override its defaults."""
    try:
        cls, defaults = ATTACKS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown attack {name!r}; known: {', '.join(sorted(ATTACKS))}") from None
    return cls(**{**defaults, **params})
