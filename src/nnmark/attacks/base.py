"""The attack protocol: one class an attack, declared parameters, a seed, a budget, one or more models.

An attack maps one or several models (and, where it needs them, the attacker's own
labelled data) to a new model; the inputs are never modified::

    stolen = FineTune("FTAL", epochs=20, seed=1).attack(model, attacker_data)
    merged = Average().attack([copy_a, copy_b, copy_c])
    stolen = build_attack("ftal", epochs=20).attack(model, attacker_data)   # by name

Each attack class declares

- ``PARAMS`` (:class:`nnmark.params.Params`): every parameter once, with its type,
  default, bounds and doc; the constructor accepts them by keyword (or, in declaration
  order, positionally), typed from strings as the command line gives them;
  every attack has a ``seed``;
- ``models``: how many input models it takes, ``(least, most)`` (``most`` ``None``: any);
- ``needs_data``: whether it needs attacker data;
- ``budget``: the name of the declared parameter that bounds the attacker's effort
  (its doc states the unit: optimisation steps, epochs, queries), or ``None``.

After :meth:`Attack.attack` the attack's ``cost`` holds what it spent: ``seconds`` (wall clock),
``samples`` (attacker data given), ``queries`` (predictions asked of the suspect: distillation,
extraction) and any attack-specific figures a subclass adds in :meth:`Attack.run`.

Attacks are found by name in the component registry (:mod:`nnmark.components`), where
one class may be registered under several names with fixed parameters (``ftal`` is
:class:`~nnmark.attacks.finetune.FineTune` with ``mode=FTAL``); third-party attacks
come in through the ``nnmark.attacks`` entry point group.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

from torch import nn

from nnmark.data.dataset import ImageDataset
from nnmark.errors import NNMarkError
from nnmark.params import Param, Params

SEED = Param("seed", int, 0, "random seed of the attack (shuffling, initialisation, random choices)", low=0)


class AttackError(NNMarkError, ValueError):
    """An attack cannot run as asked (wrong number of models, no attacker data, bad parameters)."""


class Attack(ABC):
    """Base class of every removal attack (see the module docs)."""

    name: ClassVar[str] = ""
    PARAMS: ClassVar[Params] = Params(SEED)
    models: ClassVar[tuple[int, int | None]] = (1, 1)
    needs_data: ClassVar[bool] = False
    budget: ClassVar[str | None] = None
    cost: dict[str, Any]

    def __init__(self, *args: Any, **params: Any) -> None:
        names = self.PARAMS.names()
        if len(args) > len(names):
            raise AttackError(f"attack {self.name!r} takes at most {len(names)} positional parameters "
                              f"({', '.join(names)})")
        given = dict(zip(names, args, strict=False))
        twice = sorted(set(given) & set(params))
        if twice:
            raise AttackError(f"attack {self.name!r}: parameter(s) given twice: {', '.join(twice)}")
        given.update(params)
        resolved = self.PARAMS.resolve(self.prepare(given), owner=f"attack {self.name!r}")
        for k, v in resolved.items():
            setattr(self, k, v)
        self.cost = {}  # filled by attack()

    def prepare(self, given: dict[str, Any]) -> dict[str, Any]:
        """Normalise given parameters before they are typed (default: unchanged)."""
        return given

    def attack(self, model: nn.Module | Sequence[nn.Module], data: ImageDataset | None = None) -> nn.Module:
        """Attack ``model`` (or several models) and return a new model in eval mode."""
        models = [model] if isinstance(model, nn.Module) else list(model)
        least, most = self.models
        if len(models) < least or (most is not None and len(models) > most):
            want = f"{least}" if least == most else f"{least} or more" if most is None else f"{least}-{most}"
            raise AttackError(f"attack {self.name!r} takes {want} model(s), got {len(models)}")
        if self.needs_data and (data is None or len(data) == 0):
            raise AttackError(f"attack {self.name!r} needs attacker data")
        self.cost = {"seconds": 0.0, "samples": 0 if data is None else len(data), "queries": 0}
        start = time.perf_counter()
        out = self.run(models, data)
        self.cost["seconds"] = time.perf_counter() - start
        return out

    @abstractmethod
    def run(self, models: list[nn.Module], data: ImageDataset | None) -> nn.Module:
        """The attack itself (inputs already checked; never modify ``models``)."""

    def config(self) -> dict[str, Any]:
        """The declared parameters' values."""
        return {k: getattr(self, k) for k in self.PARAMS.names()}

    def describe(self) -> dict[str, Any]:
        """Name and parameters, JSON-able."""
        return {"attack": self.name, **self.config()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


def build_attack(name: str, **params: Any) -> Attack:
    """The attack registered as ``name`` (:mod:`nnmark.components`), built with ``params`` (strings or typed
    values) over the registration's fixed parameters. :class:`~nnmark.components.ComponentError` for an
    unknown name; :class:`~nnmark.params.ParamError` for a bad parameter."""
    from nnmark.components import get_component

    comp = get_component("attack", name)
    return comp.load()(**comp.resolve(params))
