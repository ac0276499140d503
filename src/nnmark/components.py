"""One registry of named components: schemes, attacks, codes, datasets, architectures.

Every component is found by ``(kind, name)`` here -- the command line, YAML configs,
key files and ``nnmark schemes --json`` all look names up in this one place.

- nnmark's own components are listed in :data:`BUILTIN` as ``"module:attribute"``
  references, imported only when a component is used (listing names never imports
  torch); registration is explicit, never an import side effect.
- Third-party packages add their own through Python entry points, one group per kind
  (``nnmark.schemes``, ``nnmark.attacks``, ``nnmark.codes``, ``nnmark.datasets``,
  ``nnmark.architectures``). In a plugin's ``pyproject.toml``::

      [project.entry-points."nnmark.schemes"]
      my-mark = "my_plugin:MyMark"

  A plugin cannot replace a built-in of the same name (that would let an installed
  package silently change what ``verify`` means); the clash is reported by
  :meth:`ComponentRegistry.problems` and the built-in wins.

A component object declares its parameters as a class attribute ``PARAMS``
(:class:`nnmark.params.Params`); a registration may fix some of them
(``defaults``: ``ftal`` is the fine-tuning attack with ``mode=FTAL``), and those are
then not parameters of that name.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from nnmark.errors import NNMarkError
from nnmark.params import NO_PARAMS, Params

KINDS = ("scheme", "attack", "code", "dataset", "architecture")
ENTRY_POINT_GROUPS = {kind: f"nnmark.{kind}s" for kind in KINDS}


class ComponentError(NNMarkError):
    """An unknown component name, or a plugin that cannot be loaded."""


@dataclass(frozen=True)
class Component:
    """A registered component: ``ref`` is an object or a ``"module:attribute"`` string; ``defaults``
    are parameters this registration fixes; ``origin`` is ``"nnmark"`` or the plugin's distribution."""

    kind: str
    name: str
    ref: Any
    defaults: Mapping[str, Any] = field(default_factory=dict)
    doc: str = ""
    origin: str = "nnmark"

    def load(self) -> Any:
        """The component object (imported on first use)."""
        if not isinstance(self.ref, str):
            return self.ref
        module, _, attr = self.ref.partition(":")
        try:
            obj: Any = importlib.import_module(module)
            for part in attr.split(".") if attr else []:
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as exc:
            raise ComponentError(f"{self.kind} {self.name!r} ({self.origin}) cannot be loaded from "
                                 f"{self.ref}: {exc}") from None
        return obj

    @property
    def params(self) -> Params:
        """The parameters a user may set for this name (declared ones minus the fixed ``defaults``)."""
        declared = getattr(self.load(), "PARAMS", NO_PARAMS)
        return declared.extend(drop=tuple(self.defaults))

    def resolve(self, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Parsed parameters: the fixed ``defaults``, then declared defaults, then ``given``."""
        fixed = set(self.defaults) & set(given or {})
        if fixed:
            raise ComponentError(f"{self.kind} {self.name!r} fixes {', '.join(sorted(fixed))}; "
                                 f"choose another {self.kind} name instead")
        declared = getattr(self.load(), "PARAMS", NO_PARAMS)
        out = declared.resolve({**self.defaults, **dict(given or {})}, owner=f"{self.kind} {self.name!r}")
        return out

    def doc_line(self) -> str:
        if self.doc:
            return self.doc
        text = (getattr(self.load(), "__doc__", "") or "").strip()
        return " ".join(text.split("\n\n")[0].split())

    def describe(self) -> dict[str, Any]:
        """JSON-able: kind, name, origin, doc, declared parameters, fixed defaults."""
        return {"kind": self.kind, "name": self.name, "origin": self.origin, "doc": self.doc_line(),
                "params": self.params.describe(), "fixed": dict(self.defaults)}


def _builtin(kind: str, table: Mapping[str, str | tuple[str, dict[str, Any]]]) -> dict[str, Component]:
    out = {}
    for name, entry in table.items():
        ref, defaults = (entry, {}) if isinstance(entry, str) else entry
        out[name] = Component(kind, name, ref, defaults)
    return out


#: nnmark's own components (kind -> name -> reference). Adding a built-in is one line here.
BUILTIN: dict[str, dict[str, Component]] = {
    "scheme": _builtin("scheme", {
        "trigger": "nnmark.schemes.trigger_set:TriggerSetWatermark",
        "uchida": "nnmark.schemes.uchida:Uchida",
        "projection": "nnmark.schemes.projection:ProjectionRegularizer",
        "wang-manu": "nnmark.schemes.wang:WangManu",
        "wang-auto": "nnmark.schemes.wang:WangAuto",
        "output-wu": "nnmark.outputs.wu_scheme:OutputWu",
        "output-message": "nnmark.outputs.agnostic:OutputMessage",
    }),
    "attack": _builtin("attack", {
        "ftll": ("nnmark.attacks.finetune:FineTune", {"mode": "FTLL"}),
        "ftal": ("nnmark.attacks.finetune:FineTune", {"mode": "FTAL"}),
        "rtll": ("nnmark.attacks.finetune:FineTune", {"mode": "RTLL"}),
        "rtal": ("nnmark.attacks.finetune:FineTune", {"mode": "RTAL"}),
        "prune": "nnmark.attacks.prune:Prune",
        "average": "nnmark.attacks.collusion:Average",
        "permute": "nnmark.attacks.obfuscate:Permute",
        "rescale": "nnmark.attacks.obfuscate:Rescale",
        "permute-rescale": "nnmark.attacks.obfuscate:PermuteRescale",
        "fold-bn": "nnmark.attacks.structure:FoldBatchNorm",
        "split": "nnmark.attacks.structure:SplitUnits",
        "dummy": "nnmark.attacks.structure:DummyUnits",
        "merge": "nnmark.attacks.structure:MergeDuplicates",
        "ft-sgd": "nnmark.attacks.practical:ScheduledFineTune",
        "weight-shift": "nnmark.attacks.practical:WeightShift",
        "fine-prune": "nnmark.attacks.practical:FinePrune",
        "quantize": "nnmark.attacks.quantize:QuantizeWeights",
        "int8-ptq": "nnmark.attacks.quantize:Int8PostTraining",
        "overwrite": "nnmark.attacks.overwrite:Overwrite",
        "distill": "nnmark.attacks.distill:Distill",
        "transfer": "nnmark.attacks.distill:TransferLearning",
        "chain": "nnmark.attacks.chain:ChainAttack",
        "input-jpeg": "nnmark.attacks.input_side:InputJPEG",
        "input-noise": "nnmark.attacks.input_side:InputNoise",
        "input-quantize": "nnmark.attacks.input_side:InputQuantize",
        "input-smooth": "nnmark.attacks.input_side:InputSmooth",
        "magnet": "nnmark.attacks.input_side:MagNetDetector",
    }),
    "code": _builtin("code", {
        "tardos": "nnmark.codes.tardos:TardosCode",
    }),
    "dataset": _builtin("dataset", {
        "digits": "nnmark.data.resolve:digits",
        "digits28": "nnmark.data.resolve:digits28",
        "mnist5k": "nnmark.data.resolve:mnist5k",
        "digits-denoise": "nnmark.data.resolve:digits_denoise",
        "mnist5k-denoise": "nnmark.data.resolve:mnist5k_denoise",
        "photos-sr2": "nnmark.outputs.data:photos_sr2",
        "photos-colourise": "nnmark.outputs.data:photos_colourise",
        "photos-denoise": "nnmark.outputs.data:photos_denoise",
        "mnist-idx": "nnmark.data.resolve:mnist_idx",
        "cifar10": "nnmark.data.resolve:cifar10",
        "cifar100": "nnmark.data.resolve:cifar100",
    }),
    "architecture": {},
}


class ComponentRegistry:
    """Components by kind and name: the built-ins plus entry-point plugins (loaded once, lazily)."""

    def __init__(self, builtin: Mapping[str, Mapping[str, Component]] | None = None, *,
                 plugins: bool = True) -> None:
        table = BUILTIN if builtin is None else builtin
        self._by_kind: dict[str, dict[str, Component]] = {k: dict(table.get(k, {})) for k in KINDS}
        self._want_plugins = plugins
        self._plugins_loaded = False
        self._problems: list[str] = []

    def register(self, kind: str, name: str, ref: Any, *, defaults: Mapping[str, Any] | None = None,
                 doc: str = "", origin: str = "nnmark", replace: bool = False) -> Component:
        """Add a component (programmatic registration, e.g. in a user's script or a test)."""
        self._check_kind(kind)
        key = name.lower()
        if key in self._by_kind[kind] and not replace:
            raise ComponentError(f"a {kind} named {name!r} is already registered "
                                 f"({self._by_kind[kind][key].origin})")
        comp = Component(kind, key, ref, dict(defaults or {}), doc, origin)
        self._by_kind[kind][key] = comp
        return comp

    def get(self, kind: str, name: str) -> Component:
        """The component ``name`` of ``kind``; :class:`ComponentError` listing the known names."""
        self._check_kind(kind)
        self._load_plugins()
        comp = self._by_kind[kind].get(str(name).lower())
        if comp is None:
            known = ", ".join(sorted(self._by_kind[kind])) or "none"
            raise ComponentError(f"unknown {kind} {name!r}; known: {known}")
        return comp

    def names(self, kind: str) -> list[str]:
        """Sorted names of ``kind`` (built-ins and plugins)."""
        self._check_kind(kind)
        self._load_plugins()
        return sorted(self._by_kind[kind])

    def components(self, kind: str | None = None) -> list[Component]:
        kinds = KINDS if kind is None else (kind,)
        return [self.get(k, n) for k in kinds for n in self.names(k)]

    def describe(self, kind: str | None = None) -> list[dict[str, Any]]:
        """JSON-able description of every component (of ``kind``) with its declared parameters."""
        return [c.describe() for c in self.components(kind)]

    def problems(self) -> list[str]:
        """Plugins that could not be registered (name clashes, broken entry points), one line each."""
        self._load_plugins()
        return list(self._problems)

    def _check_kind(self, kind: str) -> None:
        if kind not in KINDS:
            raise ComponentError(f"unknown component kind {kind!r}; kinds: {', '.join(KINDS)}")

    def _load_plugins(self) -> None:
        if self._plugins_loaded or not self._want_plugins:
            return
        self._plugins_loaded = True
        from importlib.metadata import entry_points

        for kind, group in ENTRY_POINT_GROUPS.items():
            for ep in entry_points(group=group):
                dist = getattr(getattr(ep, "dist", None), "name", None) or "plugin"
                key = ep.name.lower()
                if key in self._by_kind[kind]:
                    self._problems.append(f"{dist}: {kind} {ep.name!r} clashes with an existing one; ignored")
                    continue
                self._by_kind[kind][key] = Component(kind, key, ep.value, {}, "", dist)


#: The process-wide registry (built-ins plus installed plugins).
REGISTRY = ComponentRegistry()


def get_component(kind: str, name: str) -> Component:
    """Shortcut for ``REGISTRY.get(kind, name)``."""
    return REGISTRY.get(kind, name)
