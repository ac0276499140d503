"""Key commitments: a verdict is evidence only for a key fixed before the suspect existed.

Why
---
Every p-value nnmark reports is a probability over the key's randomness *for a key
that is independent of the suspect*. A key whose contents can be chosen after seeing
the suspect breaks that: a trained Wang secret network, trigger images picked from the
owner's data, a custom projection target can each be fitted to any model after the
fact (measured on 10 clean MLPs: forged keys "owned" every one of them, at p <= 3e-25
for Wang, 2e-29 for trigger sets, 9e-78 for projection), and even a fully seed-derived
key (Uchida) can be ground -- try seeds until one happens to match a given model. So an
ownership claim needs proof that the key was fixed *before the suspect existed*: a
commitment.

What is committed
-----------------
``key_sha256`` is the SHA-256 of a canonical serialisation of the whole key-file content
(:func:`canonical_key_bytes`): format, version, key id, the secret, the scheme name, its
parameters (the architecture spec included) and every material tensor (name, dtype,
shape and the SHA-256 of its bytes). The *commitment record* adds the SHA-256 of the
marked model file the key was made for (when known), the UTC time of the commitment and
the key id::

    {"format": "nnmark-key-commitment", "version": 1, "key_id": "...", "scheme": "uchida",
     "key_sha256": "<64 hex>", "model_sha256": "<64 hex> | null",
     "committed_at": "2026-05-01T12:00:00.000000+00:00",
     "record_sha256": "<64 hex>", "log": {"seq": 3, "prev_hash": "...", "entry_hash": "..."}}

``record_sha256`` is the SHA-256 of the canonical JSON of the first seven fields. The
record is *public*: it holds no secret (the hash of a key file that contains a 256-bit
random secret reveals nothing about it). It is written beside the key file
(``owner.key`` -> ``owner.key.commit.json``, :func:`default_record_path`) and appended to
the *commitment log*.

The commitment log
------------------
An append-only, hash-chained SQLite database (:class:`CommitmentLog`; default
``commitments.db`` in the key file's folder, or the file named by the environment
variable ``NNMARK_COMMITMENT_LOG``; :func:`resolve_log_path`). Entry ``i`` stores the
record and ``entry_hash_i = SHA-256("nnmark-commitment-log/1", i, entry_hash_(i-1),
record_sha256_i)``; triggers refuse UPDATE and DELETE, and :meth:`CommitmentLog.verify`
recomputes the chain, so rewriting an entry (say, backdating it) is detected unless every
later entry is rewritten too -- which changes the head hash (:meth:`CommitmentLog.head`).

What the time is worth
----------------------
``committed_at`` is the committing machine's clock: against a thief who controls their own
machine it proves nothing by itself (a forger can write a record with any date). The
owner makes it count by getting the record -- or just its ``record_sha256``, or the log's
head hash, which covers every earlier entry -- out of their own hands when it is made:
publish it (a release note, a signed commit, a transparency log) or have it timestamped
by a third party (an RFC 3161 time-stamping authority; not built in). A judge then
checks the published hash against the record the verdict reports. Given
``suspect_seen_at`` (when the suspect was first seen), a commitment that is not strictly
earlier is refused outright.

Verification (:func:`check_binding`, applied to every :meth:`Scheme.verify
<nnmark.schemes.base.Scheme.verify>`)
-----------------------------------------------------------------------------------------
A scheme *loaded from a key file* (:func:`~nnmark.schemes.base.load_scheme`) reads the
record beside it (or the one given) and is evidence only with status ``committed``:
the record's ``key_sha256`` equals the key file's, its own hash is intact, the log (if
present) is unbroken, and -- when ``suspect_seen_at`` is given -- it predates the
suspect. Anything else is refused: ``owned`` is False, the p-value 1, the status and
reason in the verdict's details (``uncommitted-key``, ``commitment-mismatch``,
``commitment-altered``, ``commitment-log-broken``, ``committed-after-suspect``).
``allow_uncommitted=True`` also reports the raw statistic (``details["unverified_p_value"]``)
with a warning -- still not owned.

A scheme *built in this process* and never committed is verified as before (``owned``
from the raw test: training, attack grids and evaluation keep working) but its verdict
carries status ``in-memory`` and ``evidence: False``: it tells the key's holder whether
the mark reads, and is no proof to anyone else, since whoever runs the process could
have built the key to suit the model. Saving it (:meth:`Scheme.save
<nnmark.schemes.base.Scheme.save>`, which commits by default) makes it ``committed``
while it stays unchanged; with ``suspect_seen_at`` an uncommitted in-memory key is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

import torch

from nnmark.errors import NNMarkError
from nnmark.keyfile import FORMAT as KEY_FORMAT
from nnmark.keyfile import VERSION as KEY_VERSION
from nnmark.keyfile import KeyFile
from nnmark.safejson import JSONLimitError
from nnmark.safejson import loads as safe_json_loads
from nnmark.stats import Verdict

RECORD_FORMAT = "nnmark-key-commitment"
RECORD_VERSION = 1
CANONICAL = "nnmark-key-canonical/1"
LOG_CHAIN = "nnmark-commitment-log/1"
RECORD_SUFFIX = ".commit.json"
LOG_NAME = "commitments.db"
LOG_ENV = "NNMARK_COMMITMENT_LOG"
GENESIS = "0" * 64
MAX_RECORD_BYTES = 64 * 1024

# verification statuses
COMMITTED = "committed"
IN_MEMORY = "in-memory"
UNCOMMITTED = "uncommitted-key"
MISMATCH = "commitment-mismatch"
ALTERED = "commitment-altered"
LOG_BROKEN = "commitment-log-broken"
AFTER_SUSPECT = "committed-after-suspect"

PUBLISH_HINT = ("publish the commitment record (or its record_sha256) or have it timestamped by a third party "
                "when the key is made: committed_at is the committing machine's clock")


class CommitmentError(NNMarkError):
    """A commitment record or log is missing (when named explicitly), unreadable or malformed."""


# --------------------------------------------------------------------------- canonical key digest
def _canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def tensor_sha256(t: torch.Tensor) -> str:
    """Hex SHA-256 of a tensor's raw (little-endian, C-order) bytes."""
    t = t.detach().cpu().contiguous()
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return hashlib.sha256(raw).hexdigest()


def canonical_key_bytes(kf: KeyFile) -> bytes:
    """The canonical serialisation of a key file's whole content (secret included):
    compact JSON with sorted keys of format, version, key id, secret, scheme, params (as a
    key file stores them) and, per material tensor, its dtype, shape and SHA-256.
    Independent of the file's layout, so an in-memory scheme and its key file agree."""
    params = json.loads(json.dumps(kf.params))  # the form a key file stores (tuples -> lists, ...)
    material = {name: {"dtype": str(t.dtype).removeprefix("torch."), "shape": [int(s) for s in t.shape],
                       "sha256": tensor_sha256(t)} for name, t in kf.material.items()}
    return _canonical_json({"canonical": CANONICAL, "format": KEY_FORMAT, "version": KEY_VERSION,
                            "key_id": kf.key.key_id, "secret": kf.key.to_hex(), "scheme": kf.scheme,
                            "params": params, "material": material})


def key_digest(kf: KeyFile) -> str:
    """``key_sha256``: hex SHA-256 of :func:`canonical_key_bytes`."""
    return hashlib.sha256(canonical_key_bytes(kf)).hexdigest()


# --------------------------------------------------------------------------- time
def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def parse_time(value: str | datetime | date) -> datetime:
    """An aware UTC datetime from an ISO 8601 date or datetime (``"2026-05-01"``,
    ``"2026-05-01T12:00Z"``, ...). A date means its first instant (00:00 UTC); a time
    without an offset is taken as UTC. :class:`CommitmentError` if unparsable."""
    if isinstance(value, datetime):
        dt = value
    elif isinstance(value, date):
        dt = datetime(value.year, value.month, value.day)
    else:
        text = str(value).strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            dt = datetime.fromisoformat(text)
        except ValueError:
            raise CommitmentError(f"not an ISO 8601 date or time: {value!r} (e.g. 2026-05-01 or "
                                  "2026-05-01T12:00:00Z)") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc)


# --------------------------------------------------------------------------- records
@dataclass(frozen=True)
class Commitment:
    """One commitment record (public; see the module docs).

    ``committed_at``: ISO 8601 UTC. ``model_sha256``: hex SHA-256 of the marked model file
    the key was made for, or ``None``. ``log_*``: the entry in the commitment log
    (``None`` when not logged). ``claimed_record_sha256``: the ``record_sha256`` a record
    file states (set when read from a file; compared with the recomputed one)."""

    key_id: str
    scheme: str
    key_sha256: str
    committed_at: str
    model_sha256: str | None = None
    log_seq: int | None = None
    log_prev_hash: str | None = None
    log_entry_hash: str | None = None
    claimed_record_sha256: str | None = None

    def core(self) -> dict[str, Any]:
        """The committed fields (what ``record_sha256`` covers)."""
        return {"format": RECORD_FORMAT, "version": RECORD_VERSION, "key_id": self.key_id, "scheme": self.scheme,
                "key_sha256": self.key_sha256, "model_sha256": self.model_sha256,
                "committed_at": self.committed_at}

    @property
    def record_sha256(self) -> str:
        """Hex SHA-256 of the canonical JSON of :meth:`core`: the hash to publish."""
        return hashlib.sha256(_canonical_json(self.core())).hexdigest()

    @property
    def committed_time(self) -> datetime:
        return parse_time(self.committed_at)

    def to_dict(self) -> dict[str, Any]:
        """The record as written to ``*.commit.json``."""
        d = self.core()
        d["record_sha256"] = self.record_sha256
        d["log"] = None if self.log_seq is None else {"seq": self.log_seq, "prev_hash": self.log_prev_hash,
                                                      "entry_hash": self.log_entry_hash}
        d["note"] = ("public key commitment: contains no secret. It proves which key file existed at committed_at "
                     "only once published or timestamped by a third party; keep the key file unchanged.")
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str = "commitment record") -> Commitment:
        """Parse a record; :class:`CommitmentError` naming ``where`` if malformed."""
        if not isinstance(d, dict) or d.get("format") != RECORD_FORMAT:
            raise CommitmentError(f"{where} is not an nnmark key commitment record")
        if d.get("version") != RECORD_VERSION:
            raise CommitmentError(f"{where}: unsupported commitment record version {d.get('version')!r}")

        def hexfield(name: str, optional: bool = False) -> str | None:
            v = d.get(name)
            if v is None and optional:
                return None
            if not isinstance(v, str) or len(v) != 64 or any(c not in "0123456789abcdef" for c in v):
                raise CommitmentError(f"{where}: field {name!r} must be 64 lower-case hex digits")
            return v

        key_sha = hexfield("key_sha256")
        model_sha = hexfield("model_sha256", optional=True)
        claimed = hexfield("record_sha256", optional=True)
        if not isinstance(d.get("key_id"), str) or not isinstance(d.get("scheme"), str):
            raise CommitmentError(f"{where}: key_id and scheme must be strings")
        at = d.get("committed_at")
        if not isinstance(at, str):
            raise CommitmentError(f"{where}: committed_at must be an ISO 8601 time")
        parse_time(at)
        log = d.get("log")
        seq = prev = entry = None
        if isinstance(log, dict):
            seq = log.get("seq") if isinstance(log.get("seq"), int) else None
            prev = log.get("prev_hash") if isinstance(log.get("prev_hash"), str) else None
            entry = log.get("entry_hash") if isinstance(log.get("entry_hash"), str) else None
        assert key_sha is not None
        return cls(key_id=d["key_id"], scheme=d["scheme"], key_sha256=key_sha, committed_at=at,
                   model_sha256=model_sha, log_seq=seq, log_prev_hash=prev, log_entry_hash=entry,
                   claimed_record_sha256=claimed)


def default_record_path(key_path: str | Path) -> Path:
    """Where the record of key file ``key_path`` lives: ``<key_path>.commit.json``."""
    return Path(str(key_path) + RECORD_SUFFIX)


def resolve_log_path(key_path: str | Path | None, log: str | Path | None = None) -> Path | None:
    """The commitment log to use: ``log`` if given, else ``$NNMARK_COMMITMENT_LOG``, else
    ``commitments.db`` in the key file's folder (``None`` without a key path)."""
    if log is not None:
        return Path(log)
    env = os.environ.get(LOG_ENV)
    if env:
        return Path(env)
    return None if key_path is None else Path(key_path).parent / LOG_NAME


def write_record(path: str | Path, c: Commitment) -> None:
    """Write record ``c`` to ``path`` (JSON, atomically; mode 0644: it is public)."""
    from nnmark.keyfile import write_atomically

    write_atomically(path, (json.dumps(c.to_dict(), indent=1) + "\n").encode(), 0o644)


def read_record(path: str | Path) -> Commitment:
    """Read a record file; :class:`CommitmentError` (one line) if missing or malformed."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_RECORD_BYTES + 1)
    except FileNotFoundError:
        raise CommitmentError(f"commitment record not found: {path}") from None
    except OSError as exc:
        raise CommitmentError(f"cannot read commitment record {path}: {exc.strerror}") from None
    try:
        doc = safe_json_loads(raw, max_bytes=MAX_RECORD_BYTES, max_depth=8, what="its JSON")
    except JSONLimitError as exc:
        raise CommitmentError(f"{path} is not an nnmark key commitment record ({exc})") from None
    return Commitment.from_dict(doc, where=str(path))


# --------------------------------------------------------------------------- the log
@dataclass(frozen=True)
class LogCheck:
    """Result of :meth:`CommitmentLog.verify`: ``ok``, number of ``entries``, the ``head``
    entry hash (``GENESIS`` when empty) and the first ``problem`` found (``None`` if ok)."""

    ok: bool
    entries: int
    head: str
    problem: str | None = None


def entry_hash(seq: int, prev_hash: str, record_sha256: str) -> str:
    """The chained hash of log entry ``seq`` (see the module docs)."""
    return hashlib.sha256(f"{LOG_CHAIN}\n{seq}\n{prev_hash}\n{record_sha256}".encode()).hexdigest()


_SCHEMA = """
CREATE TABLE IF NOT EXISTS log_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT OR IGNORE INTO log_meta (name, value) VALUES ('format', 'nnmark-commitment-log'), ('version', '1');
CREATE TABLE IF NOT EXISTS commitments (
    seq INTEGER PRIMARY KEY,
    record_sha256 TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    entry_hash TEXT NOT NULL UNIQUE,
    key_id TEXT NOT NULL,
    key_sha256 TEXT NOT NULL,
    committed_at TEXT NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS commitments_record ON commitments (record_sha256);
CREATE TRIGGER IF NOT EXISTS commitments_append_only_update BEFORE UPDATE ON commitments
BEGIN SELECT RAISE(ABORT, 'the commitment log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS commitments_append_only_delete BEFORE DELETE ON commitments
BEGIN SELECT RAISE(ABORT, 'the commitment log is append-only'); END;
"""


class CommitmentLog:
    """The append-only, hash-chained commitment log (an SQLite file at ``path``)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def _connect(self, create: bool) -> sqlite3.Connection:
        if not create and not self.path.is_file():
            raise CommitmentError(f"commitment log not found: {self.path}")
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            if create:
                conn.executescript(_SCHEMA)
            else:
                fmt = conn.execute("SELECT value FROM log_meta WHERE name = 'format'").fetchone()
                if not fmt or fmt[0] != "nnmark-commitment-log":
                    raise sqlite3.DatabaseError("no log_meta")
        except sqlite3.DatabaseError:
            raise CommitmentError(f"{self.path} is not an nnmark commitment log") from None
        return conn

    def append(self, c: Commitment) -> Commitment:
        """Append record ``c``; return it with its log position (``log_seq``, hashes)."""
        conn = self._connect(create=True)
        try:
            conn.execute("BEGIN IMMEDIATE")
            row = conn.execute("SELECT seq, entry_hash FROM commitments ORDER BY seq DESC LIMIT 1").fetchone()
            seq, prev = (int(row[0]) + 1, str(row[1])) if row else (1, GENESIS)
            rec = c.record_sha256
            h = entry_hash(seq, prev, rec)
            conn.execute("INSERT INTO commitments (seq, record_sha256, prev_hash, entry_hash, key_id, key_sha256, "
                         "committed_at, record) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                         (seq, rec, prev, h, c.key_id, c.key_sha256, c.committed_at,
                          _canonical_json(c.core()).decode()))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        finally:
            conn.close()
        return replace(c, log_seq=seq, log_prev_hash=prev, log_entry_hash=h)

    def entries(self) -> list[dict[str, Any]]:
        """Every entry in order: ``seq``, ``record_sha256``, ``prev_hash``, ``entry_hash``, ``record`` (dict)."""
        conn = self._connect(create=False)
        try:
            rows = conn.execute("SELECT seq, record_sha256, prev_hash, entry_hash, record FROM commitments "
                                "ORDER BY seq").fetchall()
        finally:
            conn.close()
        out = []
        for seq, rec, prev, h, text in rows:
            try:
                record = json.loads(text)
            except (json.JSONDecodeError, RecursionError, TypeError):
                record = None
            out.append({"seq": seq, "record_sha256": rec, "prev_hash": prev, "entry_hash": h, "record": record,
                        "record_text": text})
        return out

    def head(self) -> tuple[int, str]:
        """``(entries, head entry hash)``: publish the head hash to anchor every entry so far."""
        check = self.verify()
        return check.entries, check.head

    def verify(self) -> LogCheck:
        """Recompute the chain: contiguous ``seq`` from 1, each ``prev_hash`` the previous
        entry's hash, each record's SHA-256 and each entry hash as stored."""
        prev, n = GENESIS, 0
        for e in self.entries():
            n += 1
            seq = e["seq"]
            if seq != n:
                return LogCheck(False, n, prev, f"entry {n} is missing (found seq {seq}): history was rewritten")
            if e["prev_hash"] != prev:
                return LogCheck(False, n, prev, f"entry {seq} does not chain to entry {seq - 1}")
            if hashlib.sha256(str(e["record_text"]).encode()).hexdigest() != e["record_sha256"]:
                return LogCheck(False, n, prev, f"entry {seq}'s record was altered")
            if entry_hash(seq, prev, e["record_sha256"]) != e["entry_hash"]:
                return LogCheck(False, n, prev, f"entry {seq}'s hash is wrong")
            prev = e["entry_hash"]
        return LogCheck(True, n, prev)

    def find(self, record_sha256: str) -> dict[str, Any] | None:
        """The entry holding ``record_sha256`` (``None`` if there is none)."""
        for e in self.entries():
            if e["record_sha256"] == record_sha256:
                return e
        return None


# --------------------------------------------------------------------------- committing
def commit_key(key_path: str | Path, kf: KeyFile, *, model_file: str | Path | None = None,
               model_sha256: str | None = None, log: str | Path | None = None,
               record_path: str | Path | None = None, now: datetime | None = None) -> Commitment:
    """Commit key file content ``kf`` (as written to ``key_path``): append its record to the
    log (:func:`resolve_log_path`) and write it to ``record_path`` (default
    ``<key_path>.commit.json``). ``model_file`` / ``model_sha256``: the marked model the key
    was made for (its file, or the file's hex SHA-256). ``now``: the time to record
    (default: the current UTC time). Returns the record."""
    if model_file is not None:
        from nnmark.io import file_sha256

        model_sha256 = file_sha256(model_file)
    when = parse_time(now) if now is not None else utc_now()
    c = Commitment(key_id=kf.key.key_id, scheme=kf.scheme, key_sha256=key_digest(kf),
                   committed_at=when.isoformat(timespec="microseconds"), model_sha256=model_sha256)
    log_path = resolve_log_path(key_path, log)
    if log_path is not None:
        c = CommitmentLog(log_path).append(c)
    write_record(record_path or default_record_path(key_path), c)
    return c


# --------------------------------------------------------------------------- checking
@dataclass
class CommitmentBinding:
    """What a scheme knows about its commitment.

    ``origin``: ``"memory"`` (built in this process) or ``"file"`` (loaded from a key file).
    ``record``: its commitment record, if any; ``record_path`` / ``log_path``: where from.
    ``file_digest``: ``key_sha256`` of the key file content the record is compared with (as
    written by ``save`` or read by ``load_scheme``); ``state_digest``: the scheme's own
    digest at that moment -- a later change of the scheme (retraining its material,
    recalibrating) makes the current digest differ, and the key is no longer the committed one."""

    origin: str = "memory"
    record: Commitment | None = None
    record_path: Path | None = None
    log_path: Path | None = None
    file_digest: str | None = None
    state_digest: str | None = None


@dataclass(frozen=True)
class CommitmentCheck:
    """``status`` (see the module docs), whether the verdict can be ``evidence``, a
    one-line ``reason`` and the ``details`` that go into ``verdict.details["commitment"]``."""

    status: str
    evidence: bool
    reason: str
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def refused(self) -> bool:
        return self.status not in (COMMITTED, IN_MEMORY)


def check_binding(b: CommitmentBinding, current_digest: str,
                  suspect_seen_at: str | datetime | date | None = None) -> CommitmentCheck:
    """Check a scheme's commitment (``current_digest``: its key digest now)."""
    seen = None if suspect_seen_at is None else parse_time(suspect_seen_at)
    det: dict[str, Any] = {"key_sha256": b.file_digest or current_digest,
                           "suspect_seen_at": None if seen is None else seen.isoformat()}
    changed = b.state_digest is not None and current_digest != b.state_digest

    def out(status: str, reason: str, evidence: bool = False) -> CommitmentCheck:
        det["status"] = status
        return CommitmentCheck(status, evidence, reason, det)

    if b.record is not None:
        rec = b.record
        det.update({"record": None if b.record_path is None else str(b.record_path),
                    "record_sha256": rec.record_sha256, "committed_key_sha256": rec.key_sha256,
                    "committed_at": rec.committed_at, "model_sha256": rec.model_sha256,
                    "matches_key": (not changed) and rec.key_sha256 == b.file_digest})
    else:
        det.update({"record": None if b.record_path is None else str(b.record_path), "matches_key": False})
    if b.origin == "memory" and (b.record is None or changed):
        why = "changed since it was committed" if b.record is not None else "never committed"
        if seen is not None:
            return out(UNCOMMITTED, f"this key was built in this process and {why}: nothing shows it was fixed "
                                    f"before the suspect was first seen ({seen.isoformat()})")
        return out(IN_MEMORY, f"in-memory key ({why}): a self-check for the key's holder, not evidence of "
                              "ownership -- whoever ran this process could have built the key to suit the model; "
                              "commit it (save / nnmark embed) and verify from the key file")
    if b.record is None:
        return out(UNCOMMITTED, "this key file has no commitment record: nothing shows the key was fixed before the "
                                "suspect existed, and a key can be fitted to any model after the fact (a trained "
                                "secret network, chosen triggers, a custom target, or a seed tried among millions)")
    rec = b.record
    if changed:
        return out(MISMATCH, "the key was changed after it was loaded or saved (material retrained, recalibrated?): "
                             "it is not the committed key")
    if rec.key_sha256 != b.file_digest:
        return out(MISMATCH, f"the commitment record is for another key file content (committed key SHA-256 "
                             f"{rec.key_sha256[:16]}..., this key {str(b.file_digest)[:16]}...): the key was altered "
                             "after it was committed, or the record belongs to another key")
    if rec.claimed_record_sha256 is not None and rec.claimed_record_sha256 != rec.record_sha256:
        return out(ALTERED, "the commitment record was edited after it was written (its record_sha256 does not match "
                            "its fields, e.g. a changed committed_at)")
    if b.log_path is not None and b.log_path.is_file():
        log = CommitmentLog(b.log_path)
        chk = log.verify()
        entry = log.find(rec.record_sha256) if chk.ok else None
        det["log"] = {"path": str(b.log_path), "chain_intact": chk.ok, "entries": chk.entries, "head": chk.head,
                      "contains_record": entry is not None, "seq": None if entry is None else entry["seq"]}
        if not chk.ok:
            return out(LOG_BROKEN, f"the commitment log {b.log_path} was rewritten ({chk.problem}): its history "
                                   "cannot date this key")
    else:
        det["log"] = None
    if seen is not None and rec.committed_time >= seen:
        return out(AFTER_SUSPECT, f"the key was committed at {rec.committed_at}, not before the suspect was first seen "
                                  f"({seen.isoformat()}): it may have been fitted to the suspect")
    before = "" if seen is None else f", before the suspect was first seen ({seen.isoformat()})"
    return out(COMMITTED, f"key committed at {rec.committed_at}{before}", evidence=True)


def commitment_clause(check: CommitmentCheck) -> str:
    """The sentence added to a verdict's null hypothesis about when the key was fixed."""
    d = check.details
    if check.status == COMMITTED:
        seen = d.get("suspect_seen_at")
        when = (f"before the suspect was first seen ({seen})" if seen else
                "so the verdict is evidence only against a suspect that did not exist then")
        return (f"; and the key was fixed before the suspect existed: its whole key file (SHA-256 "
                f"{d['key_sha256'][:16]}...) was committed at {d['committed_at']} (record SHA-256 "
                f"{d['record_sha256'][:16]}...), {when} -- a time its publication or third-party timestamp must "
                "establish")
    if check.status == IN_MEMORY:
        return ("; and the key was fixed before the suspect existed -- NOT checked: an in-memory key without a "
                "commitment, so this verdict is a self-check and no evidence of ownership")
    return ""


def _refused(scheme_label: str, alpha: float, check: CommitmentCheck, raw: Verdict | None,
             status: str | None = None, reason: str | None = None) -> Verdict:
    status = status or check.status
    reason = reason or check.reason
    det: dict[str, Any] = dict(raw.details) if raw is not None else {}
    det.update({"status": status, "evidence": False, "refused": reason, "commitment": check.details})
    null = (f"not tested as evidence ({status}): {reason}. A p-value is evidence of ownership only for a key fixed "
            "before the suspect existed")
    if raw is not None:
        det["unverified_p_value"] = raw.p_value
        det["unverified_owned"] = raw.owned
        det["warning"] = (f"NOT EVIDENCE ({status}): unverified_p_value = {raw.p_value:.3g} would hold only for a "
                          "key fixed before the suspect existed; this one is not shown to be")
        null += f". Had it been, H0 would be: {raw.null_hypothesis}"
    return Verdict(scheme=scheme_label, owned=False, p_value=1.0, alpha=float(alpha),
                   statistic=raw.statistic if raw is not None else 0, n=raw.n if raw is not None else 0,
                   null_hypothesis=null, details=det)


def verify_with_commitment(scheme: Any, run: Callable[[], Verdict], *, alpha: float,
                           suspect_seen_at: str | datetime | date | None = None,
                           allow_uncommitted: bool = False) -> Verdict:
    """The commitment rule around a scheme's raw test ``run`` (see the module docs).

    ``scheme`` provides ``commitment`` (a :class:`CommitmentBinding`), ``key_digest()``,
    ``evidence_refusal()`` (``(status, reason)`` for keys that are never evidence, e.g. a
    custom projection target, or ``None``) and ``name`` / ``scheme_label``."""
    label = getattr(scheme, "scheme_label", None) or scheme.name
    binding = getattr(scheme, "commitment", None) or CommitmentBinding()
    check = check_binding(binding, scheme.key_digest(), suspect_seen_at)
    never = scheme.evidence_refusal()
    if never is not None:  # measured (the read-out is still useful), never evidence
        return _refused(label, alpha, check, run(), status=never[0], reason=never[1])
    if check.refused:
        return _refused(label, alpha, check, run() if allow_uncommitted else None)
    raw = run()
    det = dict(raw.details)
    det.update({"status": check.status, "evidence": check.evidence, "commitment": check.details})
    if check.status == IN_MEMORY:
        det["warning"] = f"NOT EVIDENCE ({IN_MEMORY}): {check.reason}"
    return replace(raw, null_hypothesis=raw.null_hypothesis + commitment_clause(check), details=det)
