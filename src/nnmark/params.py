"""Declared parameters: every component states its parameters once.

A scheme, attack, code, dataset or architecture declares its parameters as a
:class:`Params` of :class:`Param` entries (name, type, default, bounds, one line of
doc). That single declaration is what

- parses ``--param KEY=VALUE`` strings from the command line and typed values from
  YAML/JSON configs and key files (:meth:`Params.resolve`);
- fills in the defaults (so a default lives in exactly one place);
- rejects an unknown or ill-typed parameter with an error that lists every valid one
  with its type and default (:class:`ParamError`);
- documents the component (:meth:`Params.describe` for ``nnmark schemes --json``,
  :meth:`Params.help` for people).

Types are the plain ones a command line can carry: ``int``, ``float``, ``str``,
``bool``, and ``list`` of one of those (``item``), written ``a,b,c`` on a command line
or as a JSON/YAML list. A default of ``None`` with ``optional=True`` means "chosen from the model
or data at build time" -- the doc line says how.

Example::

    PARAMS = Params(
        Param("bits", int, 256, "message length (at most the carrier width)", low=1),
        Param("strength", float, None, "regulariser weight; default: 0.01 on conv carriers", optional=True, low=0),
    )
    PARAMS.resolve({"bits": "512"})        # {"bits": 512, "strength": None}
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from nnmark.errors import NNMarkError

TYPES: dict[type, str] = {int: "int", float: "float", str: "str", bool: "bool", list: "list"}
SCALARS = (int, float, str, bool)
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class ParamError(NNMarkError):
    """A parameter is unknown, ill-typed or out of bounds (the message lists the valid ones)."""


@dataclass(frozen=True)
class Param:
    """One declared parameter.

    ``type``: ``int``, ``float``, ``str``, ``bool`` or ``list`` (of ``item``, a scalar type; bounds and
    choices then apply to each item). ``default``: the value used when the
    parameter is not given (``None`` only with ``optional=True``). ``low`` / ``high``:
    inclusive bounds for numbers. ``choices``: the allowed values (strings, compared
    case-sensitively). ``doc``: one line, with the unit where there is one.
    """

    name: str
    type: type
    default: Any
    doc: str
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] | None = None
    optional: bool = False
    item: type | None = None

    def __post_init__(self) -> None:
        if self.type not in TYPES:
            raise TypeError(f"parameter {self.name!r}: unsupported type {self.type!r}")
        if (self.type is list) != (self.item is not None) or (self.item is not None and self.item not in SCALARS):
            raise TypeError(f"parameter {self.name!r}: a list needs a scalar item type (and only a list has one)")
        if self.default is None and not self.optional:
            raise TypeError(f"parameter {self.name!r}: a None default needs optional=True")
        if self.default is not None:
            self.parse(self.default)  # a declaration whose default breaks its own bounds is a bug

    @property
    def type_name(self) -> str:
        name = f"list[{TYPES[self.item]}]" if self.item is not None else TYPES[self.type]
        return f"{name} | None" if self.optional else name

    def parse(self, value: Any) -> Any:
        """``value`` (a string from the command line, or a typed value from a config) as this
        parameter's type, checked against its bounds; :class:`ParamError` otherwise."""
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "")
                             and self.type is not str):
            if self.optional:
                return None
            raise ParamError(f"parameter {self.name!r} needs a {self.type_name} value")
        if self.item is not None:
            items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
            if not isinstance(items, (list, tuple)):
                raise ParamError(f"parameter {self.name!r} must be a {self.type_name}, got {value!r}")
            return [self._check(self._typed(self.item, v, value), v) for v in items]
        return self._check(self._typed(self.type, value, value), value)

    def _typed(self, t: type, value: Any, shown: Any) -> Any:
        try:
            return _convert(t, value)
        except (TypeError, ValueError):
            raise ParamError(f"parameter {self.name!r} must be a {self.type_name}, got {shown!r}") from None

    def _check(self, out: Any, value: Any) -> Any:
        if self.choices is not None and out not in self.choices:
            raise ParamError(f"parameter {self.name!r} must be one of {', '.join(map(str, self.choices))}, "
                             f"got {out!r}")
        if isinstance(out, (int, float)) and not isinstance(out, bool):
            if self.low is not None and out < self.low:
                raise ParamError(f"parameter {self.name!r} must be >= {self.low}, got {out!r}")
            if self.high is not None and out > self.high:
                raise ParamError(f"parameter {self.name!r} must be <= {self.high}, got {out!r}")
        return out

    def describe(self) -> dict[str, Any]:
        """JSON-able declaration: name, type, default, bounds, choices, doc."""
        d: dict[str, Any] = {"name": self.name, "type": self.type_name, "default": self.default, "doc": self.doc}
        if self.low is not None:
            d["low"] = self.low
        if self.high is not None:
            d["high"] = self.high
        if self.choices is not None:
            d["choices"] = list(self.choices)
        return d

    def summary(self) -> str:
        """``name (type, default X): doc`` on one line."""
        extra = ""
        if self.choices is not None:
            extra = f"; one of {'/'.join(map(str, self.choices))}"
        elif self.low is not None or self.high is not None:
            lo = "" if self.low is None else f"{self.low:g} <= "
            hi = "" if self.high is None else f" <= {self.high:g}"
            extra = f"; {lo}{self.name}{hi}"
        return f"{self.name} ({self.type_name}, default {self.default!r}{extra}): {self.doc}"


def _convert(t: type, value: Any) -> Any:
    """``value`` as scalar type ``t`` (strings parsed the way a command line writes them)."""
    if t is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        text = str(value).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ValueError(value)
    if isinstance(value, bool) or isinstance(value, (dict, list, tuple)):
        raise TypeError(value)
    if t is int:
        if isinstance(value, float):
            if not value.is_integer():
                raise ValueError(value)
            return int(value)
        if isinstance(value, int):
            return value
        text = str(value).strip()
        try:
            return int(text)
        except ValueError:
            f = float(text)  # "1e3" is a fine integer on a command line
            if not f.is_integer():
                raise
            return int(f)
    if t is float:
        out = float(value)
        if not math.isfinite(out):
            raise ValueError(value)
        return out
    return str(value)


class Params:
    """An ordered declaration of :class:`Param` entries (immutable)."""

    def __init__(self, *params: Param) -> None:
        names = [p.name for p in params]
        if len(set(names)) != len(names):
            raise TypeError(f"parameters declared twice: {names}")
        self._params = {p.name: p for p in params}

    def __iter__(self) -> Iterator[Param]:
        return iter(self._params.values())

    def __len__(self) -> int:
        return len(self._params)

    def __contains__(self, name: object) -> bool:
        return name in self._params

    def __getitem__(self, name: str) -> Param:
        return self._params[name]

    def names(self) -> list[str]:
        return list(self._params)

    def defaults(self) -> dict[str, Any]:
        """Every parameter's default."""
        return {p.name: p.default for p in self}

    def extend(self, *params: Param, drop: tuple[str, ...] = ()) -> Params:
        """A new declaration with ``params`` added (replacing same-named ones) and ``drop`` removed."""
        merged = {n: p for n, p in self._params.items() if n not in drop}
        for p in params:
            merged[p.name] = p
        return Params(*merged.values())

    def resolve(self, given: Mapping[str, Any] | None = None, *, owner: str = "component",
                partial: bool = False) -> dict[str, Any]:
        """Parse ``given`` (strings or typed values) against the declaration.

        Returns every declared parameter (defaults filled in), or with ``partial=True`` only
        the given ones. An unknown name is a :class:`ParamError` listing the valid parameters
        with their types and defaults; an ill-typed or out-of-bounds value names the bound.
        """
        given = dict(given or {})
        unknown = sorted(k for k in given if k not in self._params)
        if unknown:
            valid = "; ".join(p.summary() for p in self) or "none"
            raise ParamError(f"unknown {owner} parameter(s) {', '.join(unknown)}; valid: {valid}")
        out = {} if partial else self.defaults()
        for k, v in given.items():
            out[k] = self._params[k].parse(v)
        return out

    def describe(self) -> list[dict[str, Any]]:
        """JSON-able list of the declarations (for ``nnmark schemes --json`` and the docs)."""
        return [p.describe() for p in self]

    def help(self) -> str:
        """One line per parameter (for people)."""
        return "\n".join(p.summary() for p in self)

    def __repr__(self) -> str:
        return f"Params({', '.join(self._params)})"


NO_PARAMS = Params()


def parse_assignments(items: tuple[str, ...] | list[str]) -> dict[str, str]:
    """``("n=100", "generator=noise")`` -> ``{"n": "100", "generator": "noise"}`` (values stay strings:
    the component's declaration types them). :class:`ParamError` for an item without ``=``."""
    out: dict[str, str] = {}
    for item in items:
        k, sep, v = str(item).partition("=")
        if not sep or not k.strip():
            raise ParamError(f"expected KEY=VALUE, got {item!r}")
        out[k.strip()] = v.strip()
    return out
