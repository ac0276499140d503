"""An evaluation config (YAML) turned into a validated :class:`Plan`, before anything is trained.

Every name is looked up in the component registry (:mod:`nnmark.components`) and every parameter is
parsed against its component's one declaration (:mod:`nnmark.params`), so a config naming an unknown
scheme, attack, dataset, architecture or parameter is a :class:`ConfigError` that lists the known names
-- raised by :func:`load_plan` before the first model is built. The format::

    name: digits-grid                 # names the default output folder runs/evaluate/<name>
    dataset: digits                   # or {name: mnist-idx, params: {path: /data/mnist}}
    host: {arch: cnn, epochs: 10, batch_size: 64, lr: 0.001, optimizer: adam}
                                      # arch: a zoo preset, or "module:factory" -- a user's nn.Module,
                                      # factory(in_shape, num_classes) -> nn.Module
    alpha: 0.001                      # the verdicts' significance level
    seeds: [0, 1]                     # each seed: its own host initialisation, key and attack seed
    schemes:
      - {name: uchida, params: {bits: 64}, verify: [{align: true}, {align: false}]}
      - trigger                       # a bare name: default parameters
    attacks:
      - none                          # the unattacked marked model (the baseline row)
      - {name: ftal, params: {epochs: 5}, budgets: [1, 5]}   # budgets: values of the attack's budget parameter
      - {label: permute+ftal, chain: [permute, {name: ftal, params: {epochs: 5}}]}
      - {name: input-jpeg, applies_to: [black-box]}   # run only against black-box schemes
    false_alarm: {clean_seeds: 10, architectures: [cnn, lenet5, "my_models:tiny"], other_keys: 2}
    forgery: {tries: 100, eps: 0.1, triggers: 50}   # key search (white-box) / adversarial triggers (trigger sets)
    fingerprint: {customers: 8, coalitions: [1, 2, 3], attacks: [none, permute]}   # the tracer (harness.tracing)
    workers: 2                        # processes on this machine (the --workers option overrides it)
    ray: {address: auto}              # optional: fan the cells out over a Ray cluster instead

A chain's budgets apply to its last step that declares a budget.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nnmark.errors import NNMarkError

TOP_KEYS = ("name", "dataset", "host", "alpha", "seeds", "schemes", "attacks", "false_alarm", "forgery", "workers",
            "ray", "references", "out", "fingerprint")
FORGERY_KEYS = ("tries", "eps", "triggers")
HOST_KEYS = ("arch", "epochs", "batch_size", "lr", "optimizer", "weight_decay", "arch_params")
FALSE_ALARM_KEYS = ("clean_seeds", "architectures", "other_keys", "epochs")
MAX_CELLS = 100_000
NO_ATTACK = "none"
ACCESS_KINDS = ("black-box", "white-box")


class ConfigError(NNMarkError):
    """An evaluation config that cannot be run (unknown name or parameter, bad shape); says what is known."""


def canonical_json(obj: Any) -> str:
    """``obj`` as canonical JSON (sorted keys, no spaces): what content hashes are computed over."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def content_hash(obj: Any) -> str:
    """SHA-256 (hex) of :func:`canonical_json` of ``obj``."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


@dataclass(frozen=True)
class AttackStep:
    """One attack of a chain: registered ``name`` and its parsed parameters (``budget`` set or not)."""

    name: str
    params: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "params": self.params}


@dataclass(frozen=True)
class AttackEntry:
    """An attack row of the grid: a ``label``, its ``steps`` (empty: no attack) and the ``budgets`` to sweep
    (values of ``budget_param`` of step ``budget_step``; ``[None]``: the step's own parameters). ``applies_to``:
    the scheme access kinds it is run against (``None``: all; an input-side attack on the thief's API inputs
    leaves the weights a white-box verifier reads unchanged, so it applies to ``black-box`` schemes only)."""

    label: str
    steps: tuple[AttackStep, ...]
    budgets: tuple[Any, ...] = (None,)
    budget_step: int | None = None
    budget_param: str | None = None
    applies_to: tuple[str, ...] | None = None

    def steps_for(self, budget: Any) -> list[dict[str, Any]]:
        """The chain's steps as plain dicts, with ``budget`` written into the budgeted step."""
        out = [s.to_dict() for s in self.steps]
        out = copy.deepcopy(out)
        if budget is not None and self.budget_step is not None:
            out[self.budget_step]["params"][self.budget_param] = budget
        return out


@dataclass(frozen=True)
class SchemeEntry:
    """A scheme column of the grid: registered ``name``, parsed ``params``, verify option ``variants``."""

    label: str
    name: str
    params: dict[str, Any]
    variants: tuple[dict[str, Any], ...] = ({},)
    access: str = "black-box"


@dataclass
class Plan:
    """A validated evaluation: everything :mod:`nnmark.harness.grid` needs, JSON-able (:meth:`to_dict`)."""

    name: str
    dataset: dict[str, Any]
    host: dict[str, Any]
    alpha: float
    seeds: list[int]
    schemes: list[SchemeEntry]
    attacks: list[AttackEntry]
    false_alarm: dict[str, Any] | None = None
    workers: int = 1
    ray: dict[str, Any] | None = None
    references: list[int] = field(default_factory=lambda: [900, 901, 902, 903, 904])
    out: str | None = None
    paths: list[str] = field(default_factory=list)
    forgery: dict[str, Any] | None = None
    fingerprint: dict[str, Any] | None = None  # the tracer study (nnmark.harness.tracing)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "dataset": self.dataset, "host": self.host, "alpha": self.alpha, "seeds": self.seeds,
            "schemes": [{"label": s.label, "name": s.name, "params": s.params, "variants": list(s.variants),
                         "access": s.access} for s in self.schemes],
            "attacks": [{"label": a.label, "steps": [s.to_dict() for s in a.steps], "budgets": list(a.budgets),
                         "budget_step": a.budget_step, "budget_param": a.budget_param,
                         "applies_to": list(a.applies_to) if a.applies_to else None} for a in self.attacks],
            "false_alarm": self.false_alarm, "workers": self.workers, "ray": self.ray,
            "references": self.references, "out": self.out, "paths": self.paths, "forgery": self.forgery,
            "fingerprint": self.fingerprint,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Plan:
        schemes = [SchemeEntry(s["label"], s["name"], dict(s["params"]), tuple(s["variants"]), s["access"])
                   for s in d["schemes"]]
        attacks = [AttackEntry(a["label"], tuple(AttackStep(s["name"], dict(s["params"])) for s in a["steps"]),
                               tuple(a["budgets"]), a["budget_step"], a["budget_param"],
                               tuple(a["applies_to"]) if a.get("applies_to") else None) for a in d["attacks"]]
        return cls(d["name"], dict(d["dataset"]), dict(d["host"]), float(d["alpha"]), list(d["seeds"]), schemes,
                   attacks, d.get("false_alarm"), int(d.get("workers", 1)), d.get("ray"),
                   list(d.get("references", [])), d.get("out"), list(d.get("paths", [])), d.get("forgery"),
                   d.get("fingerprint"))


def _unknown(where: str, got: Mapping[str, Any], known: tuple[str, ...]) -> None:
    extra = sorted(set(got) - set(known))
    if extra:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(extra)}; known: {', '.join(known)}")


def _named(entry: Any, where: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``(name, params, rest)`` of a bare name or a ``{name: ..., params: {...}, ...}`` mapping."""
    if isinstance(entry, str):
        return entry, {}, {}
    if not isinstance(entry, Mapping) or not isinstance(entry.get("name", entry.get("chain")), (str, list)):
        raise ConfigError(f"{where}: expected a name or a mapping with 'name', got {entry!r}")
    params = entry.get("params") or {}
    if not isinstance(params, Mapping):
        raise ConfigError(f"{where}: 'params' must be a mapping, got {params!r}")
    rest = {k: v for k, v in entry.items() if k not in ("name", "params")}
    return str(entry.get("name", "")), dict(params), rest


def _component(kind: str, name: str, where: str) -> Any:
    from nnmark.components import REGISTRY, ComponentError

    try:
        return REGISTRY.get(kind, name)
    except ComponentError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _resolve(comp: Any, params: Mapping[str, Any], where: str) -> dict[str, Any]:
    from nnmark.components import ComponentError
    from nnmark.params import ParamError

    try:
        return comp.resolve(params)
    except (ParamError, ComponentError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def resolve_architecture(arch: str, paths: list[str] | None = None) -> Any:
    """A zoo preset name (returned as is) or the factory callable named by ``"module:factory"``
    (imported with ``paths`` prepended to ``sys.path``); :class:`ConfigError` listing the presets otherwise."""
    from nnmark.models.zoo import ARCHITECTURES

    if not isinstance(arch, str) or not arch:
        raise ConfigError(f"architecture must be a name, got {arch!r}")
    if arch in ARCHITECTURES:
        return arch
    if ":" not in arch:
        raise ConfigError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)} "
                          "or module:factory (a factory(in_shape, num_classes) -> nn.Module)")
    module, _, attr = arch.partition(":")
    for p in reversed(paths or []):
        if p not in sys.path:
            sys.path.insert(0, p)
    try:
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"architecture {arch!r} cannot be imported: {exc}") from None
    if not callable(obj):
        raise ConfigError(f"architecture {arch!r} is not callable")
    return obj


def _seeds(value: Any, where: str) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                 for v in value):
        return list(value)
    raise ConfigError(f"{where}: expected a non-empty list of non-negative integers, got {value!r}")


def _dataset(raw: Any) -> dict[str, Any]:
    name, params, rest = _named(raw if raw is not None else "digits", "dataset")
    _unknown("dataset", rest, ())
    comp = _component("dataset", name, "dataset")
    return {"name": comp.name, "params": _resolve(comp, params, f"dataset {name!r}")}


def _host(raw: Any, paths: list[str]) -> dict[str, Any]:
    raw = dict(raw or {})
    _unknown("host", raw, HOST_KEYS)
    host = {"arch": raw.get("arch", "cnn"), "epochs": raw.get("epochs", 10), "batch_size": raw.get("batch_size", 64),
            "lr": raw.get("lr", 1e-3), "optimizer": raw.get("optimizer", "adam"),
            "weight_decay": raw.get("weight_decay", 0.0), "arch_params": dict(raw.get("arch_params") or {})}
    resolve_architecture(host["arch"], paths)
    if host["optimizer"] not in ("adam", "sgd"):
        raise ConfigError(f"host optimizer must be adam or sgd, got {host['optimizer']!r}")
    for k, lo in (("epochs", 0), ("batch_size", 1)):
        if not isinstance(host[k], int) or isinstance(host[k], bool) or host[k] < lo:
            raise ConfigError(f"host {k} must be an integer >= {lo}, got {host[k]!r}")
    for k in ("lr", "weight_decay"):
        if not isinstance(host[k], (int, float)) or isinstance(host[k], bool) or host[k] < 0:
            raise ConfigError(f"host {k} must be a number >= 0, got {host[k]!r}")
        host[k] = float(host[k])
    return host


def _scheme(entry: Any, i: int) -> SchemeEntry:
    from nnmark.params import ParamError

    name, params, rest = _named(entry, f"schemes[{i}]")
    _unknown(f"scheme {name!r}", rest, ("label", "verify"))
    comp = _component("scheme", name, f"schemes[{i}]")
    cls = comp.load()
    parsed = _resolve(comp, params, f"scheme {name!r}")
    variants_raw = rest.get("verify") or [{}]
    if isinstance(variants_raw, Mapping):
        variants_raw = [variants_raw]
    if not isinstance(variants_raw, list):
        raise ConfigError(f"scheme {name!r}: 'verify' must be a mapping or a list of mappings")
    variants = []
    for v in variants_raw:
        if not isinstance(v, Mapping):
            raise ConfigError(f"scheme {name!r}: each verify variant must be a mapping, got {v!r}")
        try:
            cls.VERIFY_PARAMS.resolve(dict(v), owner=f"verify of scheme {name!r}")
        except ParamError as exc:
            raise ConfigError(f"scheme {name!r}: {exc}") from None
        variants.append(dict(v))
    return SchemeEntry(str(rest.get("label") or comp.name), comp.name, parsed, tuple(variants),
                       getattr(cls, "access", "black-box"))


def _attack(entry: Any, i: int) -> AttackEntry:
    from nnmark.params import ParamError

    where = f"attacks[{i}]"
    if entry == NO_ATTACK or (isinstance(entry, Mapping) and entry.get("name") == NO_ATTACK):
        return AttackEntry(NO_ATTACK, ())
    if isinstance(entry, Mapping) and "chain" in entry:
        _unknown(where, entry, ("chain", "label", "budgets", "applies_to"))
        chain = entry["chain"]
        if not isinstance(chain, list) or not chain:
            raise ConfigError(f"{where}: 'chain' must be a non-empty list of attacks")
        raw_steps = chain
        budgets_raw = entry.get("budgets")
        label = entry.get("label")
        applies = entry.get("applies_to")
    else:
        name, params, rest = _named(entry, where)
        _unknown(f"attack {name!r}", rest, ("label", "budgets", "applies_to"))
        raw_steps = [{"name": name, "params": params}]
        budgets_raw = rest.get("budgets")
        label = rest.get("label")
        applies = rest.get("applies_to")
    if applies is not None and (not isinstance(applies, list) or not applies
                                or set(applies) - set(ACCESS_KINDS)):
        raise ConfigError(f"{where}: applies_to must be a non-empty list of {', '.join(ACCESS_KINDS)}")
    steps = []
    budget_step = budget_param = None
    for j, raw in enumerate(raw_steps):
        name, params, rest = _named(raw, f"{where} step {j}")
        _unknown(f"attack {name!r}", rest, ())
        comp = _component("attack", name, where)
        cls = comp.load()
        _, most = getattr(cls, "models", (1, 1))
        if most is None or most > 1:
            raise ConfigError(f"{where}: attack {name!r} combines several models; the grid attacks one "
                              "marked model (collusion is studied by nnmark fingerprint)")
        if "seed" in params:
            raise ConfigError(f"{where}: attack {name!r}: 'seed' comes from the grid's seeds")
        _resolve(comp, params, f"attack {name!r}")
        if getattr(cls, "budget", None):
            budget_step, budget_param = j, cls.budget
        steps.append(AttackStep(comp.name, dict(params)))
    budgets: tuple[Any, ...] = (None,)
    if budgets_raw is not None:
        if not isinstance(budgets_raw, list) or not budgets_raw:
            raise ConfigError(f"{where}: 'budgets' must be a non-empty list")
        if budget_step is None:
            raise ConfigError(f"{where}: none of {', '.join(s.name for s in steps)} declares a budget parameter")
        comp = _component("attack", steps[budget_step].name, where)
        try:
            param = comp.params[budget_param]
            budgets = tuple(param.parse(b) for b in budgets_raw)
        except (ParamError, KeyError) as exc:
            raise ConfigError(f"{where}: budget {budget_param!r}: {exc}") from None
    label = str(label or "+".join(s.name for s in steps))
    return AttackEntry(label, tuple(steps), budgets, budget_step if budgets != (None,) else None,
                       budget_param if budgets != (None,) else None, tuple(applies) if applies else None)


def _false_alarm(raw: Any, paths: list[str], host: dict[str, Any]) -> dict[str, Any] | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise ConfigError("false_alarm must be a mapping")
    _unknown("false_alarm", raw, FALSE_ALARM_KEYS)
    seeds_raw = raw.get("clean_seeds", 10)
    seeds = list(range(1000, 1000 + seeds_raw)) if isinstance(seeds_raw, int) and not isinstance(seeds_raw, bool) \
        else _seeds(seeds_raw, "false_alarm clean_seeds")
    archs = raw.get("architectures") or [host["arch"]]
    if not isinstance(archs, list):
        raise ConfigError("false_alarm architectures must be a list")
    for a in archs:
        resolve_architecture(a, paths)
    other = raw.get("other_keys", 2)
    epochs = raw.get("epochs", host["epochs"])
    for k, v in (("other_keys", other), ("epochs", epochs)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ConfigError(f"false_alarm {k} must be an integer >= 0, got {v!r}")
    return {"clean_seeds": seeds, "architectures": list(archs), "other_keys": other, "epochs": epochs}


def plan_from_mapping(raw: Any, *, base_dir: str | Path | None = None) -> Plan:
    """Validate a parsed config (see the module docs); :class:`ConfigError` on the first problem.
    ``base_dir``: where ``module:factory`` architectures are imported from (the config's folder)."""
    if not isinstance(raw, Mapping):
        raise ConfigError("an evaluation config must be a YAML mapping")
    _unknown("config", raw, TOP_KEYS)
    paths = [str(Path(base_dir).resolve())] if base_dir is not None else []
    name = raw.get("name", "evaluation")
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise ConfigError(f"name must be a plain folder name, got {name!r}")
    dataset = _dataset(raw.get("dataset"))
    host = _host(raw.get("host"), paths)
    alpha = raw.get("alpha", 1e-3)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0 < alpha < 1:
        raise ConfigError(f"alpha must be in (0, 1), got {alpha!r}")
    seeds = _seeds(raw.get("seeds", [0]), "seeds")
    schemes_raw = raw.get("schemes")
    if not isinstance(schemes_raw, list) or not schemes_raw:
        raise ConfigError("schemes: a non-empty list is required")
    schemes = [_scheme(e, i) for i, e in enumerate(schemes_raw)]
    attacks_raw = raw.get("attacks") or [NO_ATTACK]
    if not isinstance(attacks_raw, list):
        raise ConfigError("attacks must be a list")
    attacks = [_attack(e, i) for i, e in enumerate(attacks_raw)]
    for kind, labels in (("scheme", [s.label for s in schemes]), ("attack", [a.label for a in attacks])):
        if len(set(labels)) != len(labels):
            raise ConfigError(f"two {kind}s share a label ({', '.join(labels)}); give them distinct 'label's")
    n_cells = len(schemes) * len(seeds) * sum(len(a.budgets) for a in attacks)
    if n_cells > MAX_CELLS:
        raise ConfigError(f"the grid has {n_cells} cells; at most {MAX_CELLS}")
    workers = raw.get("workers", 1)
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ConfigError(f"workers must be an integer >= 1, got {workers!r}")
    ray = raw.get("ray")
    if ray is not None and (not isinstance(ray, Mapping) or set(ray) - {"address", "num_cpus"}):
        raise ConfigError("ray must be a mapping with 'address' (and optionally 'num_cpus')")
    refs = _seeds(raw.get("references", [900, 901, 902, 903, 904]), "references")
    out = raw.get("out")
    forgery = raw.get("forgery")
    if forgery is not None:
        if not isinstance(forgery, Mapping):
            raise ConfigError("forgery must be a mapping (tries, eps, triggers)")
        _unknown("forgery", forgery, FORGERY_KEYS)
        for k, v in forgery.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0 or (k != "eps" and int(v) != v):
                raise ConfigError(f"forgery {k} must be a positive {'number' if k == 'eps' else 'integer'}, got {v!r}")
        forgery = dict(forgery)
    from nnmark.harness.tracing import parse_fingerprint

    return Plan(name, dataset, host, float(alpha), seeds, schemes, attacks,
                _false_alarm(raw.get("false_alarm"), paths, host), workers, dict(ray) if ray else None, refs,
                str(out) if out else None, paths, forgery, parse_fingerprint(raw.get("fingerprint")))


def load_plan(path: str | Path) -> Plan:
    """Read and validate the YAML config at ``path`` (safe YAML: no Python objects)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror or exc}") from None
    if len(text) > 1_000_000:
        raise ConfigError(f"{path}: a config is at most 1 MB")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return plan_from_mapping(raw, base_dir=path.parent)
