"""The scheme protocol shared by every watermark and fingerprint scheme.

A scheme is constructed from a :class:`~nnmark.keys.Key` and plain parameters;
everything random is derived from the key. It offers:

- :meth:`Scheme.training_hook` -- a :class:`~nnmark.train.TrainingHook` that embeds
  the mark while training (from scratch: "train-to-embed"; from a finished model:
  "fine-tune-to-embed"); :meth:`Scheme.embed` runs nnmark's own loop with it;
- white-box schemes: :meth:`extract` (model -> evidence); black-box schemes:
  :meth:`query` (oracle -> evidence);
- :meth:`Scheme.verify` -- model or oracle -> :class:`~nnmark.stats.Verdict`;
- :meth:`Scheme.save` / :func:`load_scheme` -- a key file (mode 0600) from which
  the scheme is rebuilt exactly, and its public commitment record (see
  :mod:`nnmark.commitment`).

Commitments: every subclass's ``verify`` is wrapped (in ``__init_subclass__``) by
:func:`nnmark.commitment.verify_with_commitment`, so that every verdict states whether
the key was fixed before the suspect existed. A scheme loaded from a key file is
evidence only with a matching, intact commitment record (otherwise ``owned`` is False
with status ``uncommitted-key``, ``commitment-mismatch``, ...); a scheme built in this
process and never committed is verified as before, its verdict marked ``in-memory``
(``details["evidence"]`` False). ``verify`` accepts two keywords besides the scheme's
own: ``suspect_seen_at`` (an ISO 8601 date/time, or datetime: a commitment that is not
earlier is refused; an uncommitted in-memory key too) and ``allow_uncommitted`` (also
report the raw statistic of a refused key, as ``details["unverified_p_value"]``; still
not owned).

Schemes are found by name in the component registry (:mod:`nnmark.components`:
nnmark's own and those of installed plugins); :data:`SCHEMES` is a read-only view of
it (name -> class) and :func:`register_scheme` adds one programmatically.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from datetime import date, datetime
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from nnmark.commitment import (
    Commitment,
    CommitmentBinding,
    commit_key,
    default_record_path,
    key_digest,
    read_record,
    resolve_log_path,
    verify_with_commitment,
)
from nnmark.data.dataset import ImageDataset
from nnmark.errors import KeyFileError, SchemeError
from nnmark.keyfile import KeyFile, load_key_file, save_key_file
from nnmark.keys import Key
from nnmark.params import Params
from nnmark.stats import Verdict
from nnmark.train import TrainConfig, TrainingHook, TrainRecord, train


class _SchemeTable(Mapping[str, "type[Scheme]"]):
    """Read-only view of the registry's schemes: name -> class (loaded on first use)."""

    def __getitem__(self, name: str) -> type[Scheme]:
        from nnmark.components import REGISTRY, ComponentError

        try:
            return REGISTRY.get("scheme", name).load()
        except ComponentError:
            raise KeyError(name) from None

    def __iter__(self) -> Iterator[str]:
        from nnmark.components import REGISTRY

        return iter(REGISTRY.names("scheme"))

    def __len__(self) -> int:
        from nnmark.components import REGISTRY

        return len(REGISTRY.names("scheme"))


SCHEMES: Mapping[str, type[Scheme]] = _SchemeTable()


def register_scheme(cls: type[Scheme]) -> type[Scheme]:
    """Add ``cls`` to the component registry under its ``name`` (e.g. a scheme defined in a user's script;
    packages use the ``nnmark.schemes`` entry point instead). Registering nnmark's own class again is a no-op."""
    from nnmark.components import REGISTRY, ComponentError

    try:
        if REGISTRY.get("scheme", cls.name).load() is cls:
            return cls
    except ComponentError:
        pass
    REGISTRY.register("scheme", cls.name, cls, origin=cls.__module__.split(".")[0], replace=True)
    return cls


class Scheme(ABC):
    """Base class of all schemes. Subclasses set ``name`` and ``access``
    (``"black-box"``: verified through predictions; ``"white-box"``: from weights)."""

    name: ClassVar[str] = ""
    access: ClassVar[str] = "black-box"
    #: the scheme's parameters, declared once (type, default, bounds, doc): see :mod:`nnmark.params`
    PARAMS: ClassVar[Params] = Params()
    #: the options of :meth:`verify` beyond ``alpha`` (``nnmark verify --param``), declared the same way
    VERIFY_PARAMS: ClassVar[Params] = Params()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        raw = cls.__dict__.get("verify")
        if raw is not None and not getattr(raw, "__isabstractmethod__", False) \
                and not getattr(raw, "_nnmark_commitment", False):
            cls.verify = _with_commitment(raw)  # type: ignore[method-assign]

    def __init__(self, key: Key) -> None:
        self.key = key
        # The architecture spec the scheme was embedded into (set by embed / load),
        # so that a key used on another architecture is reported clearly.
        self.model_spec: dict[str, Any] | None = None
        # Its commitment (built in this process until saved / loaded; see nnmark.commitment).
        self.commitment = CommitmentBinding()
        # The marked model's unit signature (nnmark.alignment.UnitSignature), kept in the key file's
        # material so that verify can undo hidden-unit permutations / rescalings; None: none recorded.
        self.reference: Any = None

    @classmethod
    def create(cls, key: Key, model: nn.Module, data: Any = None, **params: Any) -> Scheme:
        """Build the scheme for host ``model`` (and the owner's ``data``, a
        :class:`~nnmark.data.Splits`, for schemes that cut triggers from it).

        ``params`` (strings as the command line gives them, or typed values from a config) are
        parsed against the scheme's one declaration :attr:`PARAMS`: defaults filled in, an unknown
        or ill-typed parameter a :class:`~nnmark.params.ParamError` listing the valid ones; then
        :meth:`build` makes the scheme from the typed values."""
        return cls.build(key, model, data, **cls.PARAMS.resolve(params, owner=f"scheme {cls.name!r}"))

    @classmethod
    def build(cls, key: Key, model: nn.Module, data: Any = None, **params: Any) -> Scheme:
        """The scheme from parsed parameters (every declared one present). Default: ``cls(key, **params)``."""
        return cls(key, **params)

    # -- training -------------------------------------------------------------
    @abstractmethod
    def training_hook(self) -> TrainingHook:
        """The hook that embeds this scheme while training."""

    def embed(self, model: nn.Module, data: ImageDataset, config: TrainConfig | None = None, *,
              val: ImageDataset | None = None, description: str = "embedding") -> TrainRecord:
        """Train ``model`` on ``data`` with this scheme's hook (in place)."""
        self.model_spec = dict(getattr(model, "spec", {}) or {}) or None
        hook = self.training_hook()
        rec = train(model, data, config, val=val, hooks=[hook], description=description)
        hook.finalize(model)
        return rec

    # -- lifecycle: calibration on clean reference models ---------------------
    def needs_references(self) -> bool:
        """Whether the verdict's null must be measured on clean reference models (trained without the
        mark) before the scheme can verify: then call :meth:`calibrate`. Default: no (an exact null)."""
        return False

    def calibrate(self, reference_models: list[nn.Module]) -> Any:
        """Measure the null on ``reference_models``; returns what was measured. Default: nothing to measure."""
        raise SchemeError(f"scheme {self.name!r} has an exact null and needs no reference models")

    # -- verification ---------------------------------------------------------
    @abstractmethod
    def verify(self, target: Any, *, alpha: float = 1e-6, **kwargs: Any) -> Verdict:
        """Test ``target`` (a model, or an oracle for black-box schemes). Subclasses implement
        the raw statistical test; the commitment rule (module docs) is applied around it, with
        the extra keywords ``suspect_seen_at`` and ``allow_uncommitted``."""

    def evidence_refusal(self) -> tuple[str, str] | None:
        """``(status, reason)`` when this key can never be evidence, whatever its commitment
        (e.g. a projection key with a custom target); default ``None``."""
        return None

    # -- persistence ----------------------------------------------------------
    @abstractmethod
    def params(self) -> dict[str, Any]:
        """Plain JSON-able parameters (no secrets beyond what the key derives)."""

    def material(self) -> dict[str, torch.Tensor]:
        """Secret tensors that cannot be re-derived from the key (default: none)."""
        return {}

    @classmethod
    @abstractmethod
    def from_params(cls, key: Key, params: dict[str, Any],
                    material: dict[str, torch.Tensor]) -> Scheme:
        """Rebuild from a key file's contents."""

    def key_file(self) -> KeyFile:
        """The key file content that rebuilds this scheme (secret, name, params with the
        architecture spec, material)."""
        params = dict(self.params())
        if self.model_spec is not None:
            params["model_spec"] = self.model_spec
        material = dict(self.material())
        if self.reference is not None:
            material.update(self.reference.to_material())
        return KeyFile(self.key, self.name, params, material)

    def key_digest(self) -> str:
        """``key_sha256`` of :meth:`key_file` (what a commitment covers)."""
        return key_digest(self.key_file())

    def save(self, path: str | Path, *, commit: bool = True, model_file: str | Path | None = None,
             model_sha256: str | None = None, log: str | Path | None = None) -> Commitment | None:
        """Write the key file (mode 0600) that rebuilds this scheme and, with ``commit``
        (default), commit it: the public record ``<path>.commit.json`` and an entry in the
        commitment log (``log``; default :func:`~nnmark.commitment.resolve_log_path`).
        ``model_file`` / ``model_sha256``: the marked model the key was made for, recorded in
        the commitment. Returns the record (``None`` without ``commit``)."""
        kf = self.key_file()
        save_key_file(path, kf)
        if not commit:
            return None
        digest = key_digest(kf)
        record = commit_key(path, kf, model_file=model_file, model_sha256=model_sha256, log=log)
        self.commitment = CommitmentBinding(origin="memory", record=record, record_path=default_record_path(path),
                                            log_path=resolve_log_path(path, log), file_digest=digest,
                                            state_digest=digest)
        return record

    def __repr__(self) -> str:
        return f"{type(self).__name__}(key={self.key!r})"


def load_scheme(path: str | Path, expect: str | None = None, *, commitment: str | Path | None = None,
                log: str | Path | None = None) -> Scheme:
    """Rebuild a scheme from its key file. ``expect``: the scheme family the caller
    needs (e.g. ``"trigger"``); a key file for another scheme is a clear error.

    ``commitment``: the key's commitment record (default ``<path>.commit.json`` when it
    exists; a record named explicitly must exist). ``log``: the commitment log to check it
    against (default :func:`~nnmark.commitment.resolve_log_path`; skipped if absent). A key
    without a record loads, but its verdicts are refused (``uncommitted-key``).
    :class:`~nnmark.commitment.CommitmentError` for a malformed record."""
    kf = load_key_file(path, expect_scheme=expect)
    cls = SCHEMES.get(kf.scheme)
    if cls is None:
        raise KeyFileError(f"{path}: unknown scheme {kf.scheme!r} (known: {', '.join(SCHEMES)}; a plugin's "
                           "scheme needs its package installed)")
    params = dict(kf.params)
    spec = params.pop("model_spec", None)
    from nnmark.alignment import AlignmentError, UnitSignature

    try:
        scheme = cls.from_params(kf.key, params, UnitSignature.strip(kf.material))
        scheme.reference = UnitSignature.from_material(kf.material)
    except (KeyError, TypeError, ValueError, AlignmentError) as exc:
        raise KeyFileError(f"{path}: invalid parameters for {kf.scheme!r}: {exc}") from None
    scheme.model_spec = spec
    record_path = Path(commitment) if commitment is not None else default_record_path(path)
    record = read_record(record_path) if commitment is not None or record_path.exists() else None
    scheme.commitment = CommitmentBinding(origin="file", record=record, record_path=record_path,
                                          log_path=resolve_log_path(path, log), file_digest=key_digest(kf),
                                          state_digest=scheme.key_digest())
    return scheme


def _with_commitment(raw: Any) -> Any:
    """Wrap a scheme's raw ``verify`` with the commitment rule (re-entrant calls, e.g. a
    subclass calling ``super().verify``, run the raw test only)."""

    @functools.wraps(raw)
    def verify(self: Scheme, target: Any, *args: Any, suspect_seen_at: str | datetime | date | None = None,
               allow_uncommitted: bool = False, **kwargs: Any) -> Verdict:
        if getattr(self, "_nnmark_verifying", False):
            return raw(self, target, *args, **kwargs)

        def run() -> Verdict:
            self._nnmark_verifying = True
            try:
                return raw(self, target, *args, **kwargs)
            finally:
                self._nnmark_verifying = False

        return verify_with_commitment(self, run, alpha=float(kwargs.get("alpha", 1e-6)),
                                      suspect_seen_at=suspect_seen_at, allow_uncommitted=bool(allow_uncommitted))

    verify._nnmark_commitment = True  # type: ignore[attr-defined]
    return verify
