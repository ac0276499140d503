"""A black-box fingerprinted product: one base model, one key, a Tardos code, keyed triggers, one registry.

    prod = BlackBoxProduct.create("shop/", "base.safetensors", m=512, capacity=10000)  # key.json (0600)
    prod.add_customers(["alice", "bob"])
    prod.issue("alice")                                  # fine-tuned copy under shop/copies/, SHA-256 recorded
    report = prod.trace(HTTPOracle("http://host:8000"))  # -> BlackBoxTraceReport (nnmark.blackbox.trace)

The directory holds ``product.json`` (public parameters, ``format: nnmark-blackbox-product``), ``key.json``
(the secret, mode 0600, with its public commitment), ``base.safetensors``, ``registry.db`` (SQLite, or any
SQLAlchemy URL given at creation, e.g. PostgreSQL) and ``copies/``. The registry is the fingerprint family's
(:mod:`nnmark.registry`): code ``u`` of the registry is Tardos codeword ``u``; issuing reserves a code, writes
the copy atomically and completes the record with its SHA-256; :meth:`BlackBoxProduct.recover` settles
reservations of dead issuers (a lease that is no longer renewed), completing those whose file answers the
triggers as codeword ``u`` must (the trace of that file names ``u``).

Everything secret -- biases, codewords, the trigger images, their labels and query order -- derives from the
key and the product's dataset; nothing of it is stored in clear.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from nnmark.blackbox.answers import DEFAULT_TEMPERATURE, base_reference
from nnmark.blackbox.issue import BlackBoxIssueConfig, BlackBoxIssueRecord, issue_blackbox_copy
from nnmark.blackbox.tilt import HeadTilt
from nnmark.blackbox.trace import DEFAULT_ALPHA, BlackBoxTraceReport, trace_oracle
from nnmark.blackbox.triggers import DEFAULT_NOISE, TriggerSet, make_triggers
from nnmark.codes.tardos import TardosCode
from nnmark.errors import NNMarkError
from nnmark.io import file_sha256, load_model, save_model, spec_difference
from nnmark.keyfile import KeyFile, load_key_file, save_key_file
from nnmark.keys import Key
from nnmark.registry import IssuedCopy, RecoveryReport, Registry
from nnmark.registry.store import database_url
from nnmark.safejson import loads as safe_json_loads

FORMAT = "nnmark-blackbox-product"
KEY_SCHEME = "blackbox"
CONFIG_NAME, KEY_NAME, BASE_NAME, REGISTRY_NAME, COPIES_DIR = (
    "product.json", "key.json", "base.safetensors", "registry.db", "copies")
MAX_CONFIG_BYTES = 1 << 20


class BlackBoxError(NNMarkError):
    """A black-box product cannot do what was asked."""


def is_blackbox_product(path: str | Path) -> bool:
    """Whether ``path`` is a black-box product directory (its ``product.json`` says so)."""
    cfg = Path(path) / CONFIG_NAME
    if not cfg.is_file():
        return False
    try:
        return safe_json_loads(cfg.read_bytes()[: MAX_CONFIG_BYTES + 1], max_bytes=MAX_CONFIG_BYTES,
                               what=str(cfg)).get("format") == FORMAT
    except Exception:  # noqa: BLE001 - unreadable: not ours
        return False


@dataclass
class BlackBoxConfig:
    """Public parameters (``product.json``; also stored in the registry)."""

    name: str
    base_sha256: str
    key_id: str
    spec: dict[str, Any]
    data: str
    m: int
    capacity: int
    colluders: int
    cutoff: float
    noise: float = DEFAULT_NOISE
    alpha: float = DEFAULT_ALPHA
    issue: dict[str, Any] = field(default_factory=dict)
    registry_url: str | None = None
    created_at: float = 0.0
    format: str = FORMAT

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> BlackBoxConfig:
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise BlackBoxError("not an nnmark black-box product configuration")
        try:
            return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})
        except TypeError as exc:
            raise BlackBoxError(f"malformed black-box product configuration: {exc}") from None


class BlackBoxProduct:
    """See the module doc; build with :meth:`create` or :meth:`open`."""

    def __init__(self, root: Path, config: BlackBoxConfig, key: Key, registry: Registry) -> None:
        self.root, self.config, self._key, self.registry = root, config, key, registry
        self.code = TardosCode.from_key(key.child("blackbox/code"), m=config.m, n_codes=config.capacity,
                                        cutoff=config.cutoff, colluders=config.colluders)
        self._base: nn.Module | None = None
        self._splits = None
        self._triggers: TriggerSet | None = None
        self._tilt: HeadTilt | None = None
        self._reference: np.ndarray | None = None

    @classmethod
    def create(cls, directory: str | Path, base_model: str | Path, *, key: Key | None = None, m: int = 512,
               capacity: int = 10000, colluders: int = 5, cutoff: float | None = None,
               noise: float = DEFAULT_NOISE, data: str | None = None, alpha: float = DEFAULT_ALPHA,
               issue: BlackBoxIssueConfig | None = None, registry_url: str | None = None,
               name: str | None = None) -> BlackBoxProduct:
        """Create a product directory from the vendor's base model file (module doc).

        ``m``: code length = trigger queries (default 512); ``capacity``: codes (customers) the registry holds
        (default 10,000); ``colluders``: design coalition size ``c`` (cutoff ``1/(300 c)`` unless ``cutoff``);
        ``noise``: the triggers' perturbation (std on [0, 1] pixels, default 0.1); ``data``: the training data
        name (default: the base file's); ``alpha``: the registry-wide false-accusation level per trace
        (default 1e-6). Refuses an existing product."""
        root = Path(directory)
        if (root / CONFIG_NAME).exists() or (root / KEY_NAME).exists():
            raise BlackBoxError(f"a product already exists in {root}")
        base, meta = load_model(base_model)
        data = data or meta.get("data")
        if not data:
            raise BlackBoxError("a black-box product needs the training data's name (give data=...)")
        key = key or Key.generate()
        code = TardosCode.from_key(key.child("blackbox/code"), m=m, n_codes=capacity, cutoff=cutoff,
                                   colluders=colluders)
        root.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(base_model, root / BASE_NAME)
        cfg = BlackBoxConfig(name=name or root.resolve().name, base_sha256=file_sha256(root / BASE_NAME),
                             key_id=key.key_id, spec=dict(base.spec), data=str(data), m=code.m,
                             capacity=code.n_codes, colluders=code.colluders, cutoff=code.cutoff, noise=float(noise),
                             alpha=float(alpha), issue=(issue or BlackBoxIssueConfig()).to_dict(),
                             registry_url=registry_url, created_at=time.time())
        prod_key = KeyFile(key=key, scheme=KEY_SCHEME, params={"product": cfg.name})
        save_key_file(root / KEY_NAME, prod_key)
        from nnmark.commitment import commit_key

        commit_key(root / KEY_NAME, prod_key, model_sha256=cfg.base_sha256)
        order = key.numpy_rng("blackbox/code-order").permutation(code.n_codes)
        reg = Registry.create(registry_url or database_url(root / REGISTRY_NAME), product=cfg.name,
                              base_sha256=cfg.base_sha256, key_id=key.key_id, code_family=cfg.to_dict(),
                              codes=order)
        (root / CONFIG_NAME).write_text(json.dumps(cfg.to_dict(), indent=1))
        (root / COPIES_DIR).mkdir(exist_ok=True)
        prod = cls(root, cfg, key, reg)
        prod._base = base
        prod.triggers  # noqa: B018 - fail now if the dataset cannot hold m triggers
        return prod

    @classmethod
    def open(cls, directory: str | Path, *, key_file: str | Path | None = None) -> BlackBoxProduct:
        """Open a product directory (the key file is ``key.json`` in it unless given)."""
        root = Path(directory)
        path = root / CONFIG_NAME
        if not path.is_file():
            raise BlackBoxError(f"{root} is not a product directory (no {CONFIG_NAME})")
        with path.open("rb") as fh:
            cfg = BlackBoxConfig.from_dict(safe_json_loads(fh.read(MAX_CONFIG_BYTES + 1), max_bytes=MAX_CONFIG_BYTES,
                                                           what=str(path)))
        kf = load_key_file(key_file or root / KEY_NAME, expect_scheme=KEY_SCHEME)
        if kf.key.key_id != cfg.key_id:
            raise BlackBoxError(f"the key file is for key {kf.key.key_id}, this product uses key {cfg.key_id}")
        reg = Registry.open(cfg.registry_url or database_url(root / REGISTRY_NAME), product=cfg.name,
                            base_sha256=cfg.base_sha256, key_id=cfg.key_id)
        return cls(root, cfg, kf.key, reg)

    # -- parts ------------------------------------------------------------------------
    @property
    def base_model(self) -> nn.Module:
        if self._base is None:
            path = self.root / BASE_NAME
            if file_sha256(path) != self.config.base_sha256:
                raise BlackBoxError(f"the base model file {path} changed since the product was created")
            self._base, _ = load_model(path, expect_spec=self.config.spec)
        return self._base

    @property
    def splits(self):
        if self._splits is None:
            from nnmark.data import load_data

            self._splits = load_data(self.config.data)
        return self._splits

    @property
    def triggers(self) -> TriggerSet:
        """The product's keyed triggers (:mod:`nnmark.blackbox.triggers`)."""
        if self._triggers is None:
            try:
                self._triggers = make_triggers(self._key.child("blackbox/triggers"), self.splits, self.config.m,
                                               self.config.noise)
            except ValueError as exc:
                raise BlackBoxError(str(exc)) from None
        return self._triggers

    @property
    def issue_config(self) -> BlackBoxIssueConfig:
        return BlackBoxIssueConfig.from_dict(self.config.issue)

    @property
    def tilt(self) -> HeadTilt:
        """The output-layer tilt directions of the base (:mod:`nnmark.blackbox.tilt`; solved on first use)."""
        if self._tilt is None:
            self._tilt = HeadTilt.solve(self.base_model, self.triggers, self.splits.train.x,
                                        ridge=self.issue_config.ridge)
        return self._tilt

    @property
    def reference(self) -> np.ndarray | None:
        """The logit differences ``d0`` ``(m,)`` the tracer subtracts from a suspect's (tilted products: the
        base's own on the triggers; ``None`` for fine-tuned products, whose copies override the base's)."""
        if self.issue_config.method != "tilt":
            return None
        if self._reference is None:
            self._reference = base_reference(self.base_model, self.triggers)
        return self._reference

    def holders(self, include_reserved: bool = True) -> dict[int, str]:
        """``{code index: customer}`` of codes handed out (reserved ones too, by default)."""
        return self.registry.assigned_codes(include_reserved=include_reserved)

    # -- customers and issuing ------------------------------------------------------------
    def add_customers(self, names: list[str]) -> int:
        return self.registry.add_customers([str(n) for n in names])

    def make_copy(self, code_index: int, start: nn.Module | None = None) -> tuple[nn.Module, BlackBoxIssueRecord]:
        """The copy of codeword ``code_index`` (no registry, no file: for measurements), fine-tuned from ``start``
        (default: the base model; e.g. the customer's weight-fingerprinted copy, :mod:`nnmark.blackbox.combined`)."""
        cfg = self.issue_config
        if start is not None:
            diff = spec_difference(dict(getattr(start, "spec", {})), dict(self.config.spec))
            if diff:
                raise BlackBoxError(f"the start model does not have the product's architecture ({diff})")
        if cfg.method == "tilt":
            t, cpu = time.perf_counter(), time.process_time()
            tilt = self.tilt if start is None else HeadTilt.solve(start, self.triggers, self.splits.train.x,
                                                                  ridge=cfg.ridge)
            bits = self.code.codeword(code_index)
            model = tilt.apply(self.base_model if start is None else start, bits, cfg.delta)
            d = base_reference(model, self.triggers)
            ref = self.reference if start is None else base_reference(start, self.triggers)
            agree = float(np.mean((d - ref > 0) == bits))
            return model, BlackBoxIssueRecord(time.perf_counter() - t, 0, agree, time.process_time() - cpu)
        return issue_blackbox_copy(self.base_model if start is None else start, self.triggers,
                                   self.code.codeword(code_index), self.splits.train, cfg,
                                   shuffle_seed=cfg.seed * 1_000_003 + int(code_index))

    def issue(self, customer: str, out: str | Path | None = None, start: nn.Module | None = None) -> IssuedCopy:
        """Issue one copy to ``customer``: reserve a code, fine-tune (from ``start``, default the base), write the
        file atomically, complete the record with its SHA-256; on any error the reservation is aborted and the
        partial file removed (:meth:`nnmark.registry.Registry.issue_file`)."""
        n = len(self.registry.issued_copies(customer)) + 1
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in customer)[:48] or "customer"
        path = Path(out) if out is not None else self.root / COPIES_DIR / f"{safe}-{n}.safetensors"

        def write(res, dest: Path) -> None:
            model, rec = self.make_copy(res.code_index, start)
            save_model(dest, model, {"data": self.config.data, "product": self.config.name,
                                     "issue": {"seconds": rec.seconds, "cpu_seconds": rec.cpu_seconds,
                                               "steps": rec.steps, "symbol_accuracy": rec.symbol_accuracy}})

        return self.registry.issue_file(customer, path, write)

    def pending_customers(self, names: list[str] | None = None) -> list[str]:
        """Customers (all, or among ``names``) without a complete issued copy."""
        return self.registry.pending_customers(names)

    def recover(self, older_than_s: float = 0.0) -> RecoveryReport:
        """Settle reservations whose issuer is gone: complete those whose file's trace names the reserved
        code, release the others."""

        def carries(path: Path, res) -> bool:
            try:
                from nnmark.blackbox.answers import ProbabilityOracle

                rep = self.trace(ProbabilityOracle(load_model(path, expect_spec=self.config.spec)[0]),
                                 stop="budget", holders={res.code_index: res.customer})
                return res.customer in rep.named_customers
            except Exception:  # noqa: BLE001 - an unreadable file is simply not usable
                return False

        return self.registry.recover(older_than_s=older_than_s, verify=carries)

    # -- tracing ----------------------------------------------------------------------------
    def trace(self, oracle: Any, *, budget: int | None = None, looks: list[int] | None = None, stop: str = "first",
              holders: dict[int, str] | None = None, top: int = 5, answers: str = "auto",
              temperature: float = DEFAULT_TEMPERATURE) -> BlackBoxTraceReport:
        """Trace the suspect behind ``oracle`` (:func:`nnmark.blackbox.trace.trace_oracle`) against every code of
        the capacity; named customers are the holders of the passing codes (default: the registry's).
        ``answers``: ``"auto"`` (soft when the oracle returns score rows, else labels) or ``"labels"``;
        ``temperature``: of the soft weights (:mod:`nnmark.blackbox.answers`). Tilted products subtract the
        base's logit differences (:attr:`reference`) from the suspect's."""
        tilted = self.issue_config.method == "tilt"
        if tilted and answers == "labels":
            raise BlackBoxError("this product's copies are tilted: they differ in their class scores, not their "
                                "labels, so a trace must read scores (answers='auto' and an API that shows "
                                "probabilities or logits)")
        rep = trace_oracle(oracle, self.code, self.triggers, holders=self.holders() if holders is None else holders,
                           alpha=self.config.alpha, budget=budget, looks=looks, stop=stop, top=top, answers=answers,
                           temperature=temperature, reference=self.reference)
        if tilted and rep.answers_read == "labels":
            rep.evidence["warning"] = ("the API answered labels only; this product's tilted copies differ in their "
                                       "scores, so these answers carry no evidence (nobody can be named)")
        return rep

    def status(self) -> dict[str, Any]:
        return {"product": self.config.name, "code": f"tardos m={self.config.m}", "capacity": self.config.capacity,
                "key_id": self.config.key_id, **self.registry.counts()}

