"""The registry of issued fingerprinted copies, in SQL (SQLite by default).

One registry belongs to one *product*: a base model (its file's SHA-256), the
key that derives its fingerprints (by ``key_id`` only -- the secret never enters
the database) and the code family's parameters. It records the customers (and
their community), the codes (``codebook``, ``idx``) with the order in which to
hand them out (``rank``), which customer holds which code, and every issued
model file with its SHA-256 and timestamps.

The order is part of the secret: fingerprint products fill it with a key-derived permutation of the codes
(:func:`nnmark.codes.order.secret_issue_order`), so that a coalition cannot tell its codes from its place
in the issue order. The registry stores the ranks, never the key; registries filled in the natural order
before that keep it (it is read, never rewritten).

Issuing protocol (crash-safe)
-----------------------------
1. ``res = reg.reserve_code(customer, planned_path=path)`` -- one transaction
   binds a free code (lowest ``rank``) to the customer and writes a
   ``reserved`` issue row. A conditional ``UPDATE ... WHERE customer_id IS NULL``
   plus a unique constraint on ``codes.customer_id`` make two concurrent issuers
   (threads, processes, hosts on PostgreSQL) unable to take the same code; a
   loser retries with the next free code.
2. Write the model file (atomically, e.g. :func:`nnmark.io.save_model`).
3. ``reg.complete_issue(res, path, sha256)`` -- checks that the file exists and
   has that hash, then marks the issue ``complete`` and the code ``assigned``.

Only ``complete`` rows point to model files, and they are written after the
file is verified, so a crash never leaves a record pointing to a missing
model. A crash between 1 and 3 leaves a ``reserved`` row holding a code;
:meth:`Registry.recover` finds reservations older than a limit whose issuer is
gone, and either completes them (the planned file exists and passes
an optional ``verify`` callback) or releases the code -- so no code is lost.
A customer keeps its code for later copies (same fingerprint).

Leases: every reservation holds a lease (``issue_leases``: holder, expiry) of ``lease_s`` seconds (default
:data:`DEFAULT_LEASE_S`), which the issuing :class:`Registry` object renews from a background heartbeat thread
every ``lease_s / 3`` until the issue is completed or aborted. An issuer killed by SIGKILL stops renewing; an
issuer alive on any host keeps its lease current, so :meth:`Registry.recover` (see
:mod:`nnmark.registry.recovery`) never releases its reservation -- no same-host process check is needed
(it is still used as a shortcut: a reservation of a dead process on this host is settled at once).

Layout: the tables are in :mod:`nnmark.registry.schema`, the errors and records in
:mod:`nnmark.registry.records`, crash recovery and the audit in :mod:`nnmark.registry.recovery`;
this module is the store and its reservation state machine.

SQLite specifics: each transaction starts with ``BEGIN IMMEDIATE`` (the write
lock is taken up front, so concurrent issuers queue instead of failing to
upgrade a read lock) and waits up to ``busy_timeout_s`` for the lock.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, IntegrityError

from nnmark.registry.records import (
    Customer,
    IssuedCopy,
    ProductInfo,
    RecoveryReport,
    RegistryError,
    RegistryNotFoundError,
    RegistryProductError,
    RegistrySchemaError,
    Reservation,
    database_url,
)
from nnmark.registry.recovery import RecoveryMixin, _sha256_of
from nnmark.registry.schema import (
    SCHEMA_VERSION,
    codes_table,
    customers_table,
    issues_table,
    lease_metadata,
    leases_table,
    meta_table,
    metadata,
    product_table,
)

DEFAULT_LEASE_S = 60.0
"""How long a reservation's lease lasts without renewal (seconds); the issuer renews it every third of that."""

__all__ = ["SCHEMA_VERSION", "Customer", "IssuedCopy", "ProductInfo", "RecoveryReport", "Registry", "RegistryError",
           "RegistryNotFoundError", "RegistryProductError", "RegistrySchemaError", "Reservation", "database_url"]


class Registry(RecoveryMixin):
    """An issued-copies registry (use :meth:`create` or :meth:`open`; both take a database URL or a file path).

    ``busy_timeout_s``: how long an SQLite writer waits for the lock. ``lease_s``: the lease of this object's
    reservations (module doc). Thread- and process-safe; keep one ``Registry`` per process.
    """

    def __init__(self, engine: Engine, url: str, lease_s: float = DEFAULT_LEASE_S) -> None:
        self._engine = engine
        self.url = url
        self.lease_s = float(lease_s)
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self._held: set[str] = set()
        self._held_lock = threading.Lock()
        self._heartbeat: threading.Thread | None = None
        self._stop = threading.Event()
        self.leases_enabled = False  # set by create() / open() once the database is known to be a registry

    def _ensure_lease_table(self) -> bool:
        try:
            with self._engine.begin() as conn:
                lease_metadata.create_all(conn, checkfirst=True)
            return True
        except DBAPIError:  # e.g. a read-only database: leases off, recovery uses the same-host check
            return False

    # -- construction -------------------------------------------------------------
    @staticmethod
    def _make_engine(url: str, busy_timeout_s: float) -> Engine:
        if url.startswith("sqlite"):
            engine = sa.create_engine(url, connect_args={"timeout": busy_timeout_s}, poolclass=sa.pool.NullPool)

            @event.listens_for(engine, "connect")
            def _on_connect(dbapi_conn, _record):  # pragma: no cover - driver plumbing
                dbapi_conn.isolation_level = None  # we emit BEGIN ourselves
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA foreign_keys=ON")
                cur.close()

            @event.listens_for(engine, "begin")
            def _on_begin(conn):  # pragma: no cover - driver plumbing
                conn.exec_driver_sql("BEGIN IMMEDIATE")

            return engine
        return sa.create_engine(url, pool_pre_ping=True)

    @staticmethod
    def _sqlite_path(url: str) -> str | None:
        u = sa.engine.make_url(url)
        if u.get_backend_name() != "sqlite":
            return None
        return u.database or ":memory:"

    @classmethod
    def create(
        cls,
        url: str | os.PathLike,
        *,
        product: str,
        base_sha256: str,
        key_id: str,
        code_family: dict[str, Any],
        codes: int | Sequence[int] | np.ndarray,
        codebook: str = "cic",
        busy_timeout_s: float = 60.0,
        lease_s: float = DEFAULT_LEASE_S,
    ) -> Registry:
        """Create a new registry and fill its code table.

        ``codes``: the number ``n`` of codes (indices ``0..n-1`` handed out in that
        order) or the code indices in the order to hand them out (e.g.
        :func:`nnmark.codes.order.secret_issue_order`, as products do). ``code_family``: plain
        JSON-able parameters (e.g. ``code.params()``). ``key_id`` is the public key
        identifier (:attr:`nnmark.keys.Key.key_id`), never the secret.
        Refuses to overwrite an existing registry.
        """
        url = database_url(url)
        path = cls._sqlite_path(url)
        if path == ":memory:":
            raise RegistryError("an in-memory SQLite registry would vanish at once; give a file path")
        if path is not None and Path(path).exists() and Path(path).stat().st_size > 0:
            raise RegistryError(f"a registry already exists at {path}")
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        if len(base_sha256) != 64 or any(ch not in "0123456789abcdef" for ch in base_sha256.lower()):
            raise RegistryError("base_sha256 must be a 64-hex-digit SHA-256")
        order = np.arange(codes) if isinstance(codes, (int, np.integer)) else np.asarray(codes, dtype=np.int64)
        if order.ndim != 1 or order.size == 0 or len(np.unique(order)) != order.size:
            raise RegistryError("codes must be a positive count or distinct code indices")
        engine = cls._make_engine(url, busy_timeout_s)
        with engine.begin() as conn:
            if sa.inspect(conn).has_table("nnmark_meta"):
                raise RegistryError(f"a registry already exists at {url}")
            metadata.create_all(conn)
            now = time.time()
            conn.execute(
                meta_table.insert(),
                [
                    {"key": "schema_version", "value": str(SCHEMA_VERSION)},
                    {"key": "format", "value": "nnmark-registry"},
                ],
            )
            conn.execute(
                product_table.insert().values(
                    id=1,
                    name=product,
                    base_sha256=base_sha256.lower(),
                    key_id=key_id,
                    code_family=json.dumps(code_family, sort_keys=True),
                    created_at=now,
                )
            )
            rows = [{"codebook": codebook, "idx": int(i), "rank": r, "state": "free"} for r, i in enumerate(order)]
            for start in range(0, len(rows), 5000):
                conn.execute(codes_table.insert(), rows[start : start + 5000])
        reg = cls(engine, url, lease_s=lease_s)
        reg.leases_enabled = reg._ensure_lease_table()
        return reg

    @classmethod
    def open(
        cls,
        url: str | os.PathLike,
        *,
        product: str | None = None,
        base_sha256: str | None = None,
        key_id: str | None = None,
        busy_timeout_s: float = 60.0,
        lease_s: float = DEFAULT_LEASE_S,
    ) -> Registry:
        """Open an existing registry; checks the schema and, when given, the product name, base-model hash and
        key id. Raises :class:`RegistryNotFoundError`, :class:`RegistrySchemaError`, :class:`RegistryProductError`."""
        url = database_url(url)
        path = cls._sqlite_path(url)
        if path == ":memory:":
            raise RegistryNotFoundError("an in-memory database holds no registry to open")
        if path is not None and not Path(path).is_file():
            raise RegistryNotFoundError(f"registry not found: {path}")
        engine = cls._make_engine(url, busy_timeout_s)
        reg = cls(engine, url, lease_s=lease_s)
        try:
            reg._check_schema()
        except DBAPIError as exc:
            raise RegistrySchemaError(f"{url} is not a readable registry database ({exc.orig})") from None
        reg.leases_enabled = reg._ensure_lease_table()
        info = reg.product
        for what, want, have in (
            ("product", product, info.name),
            ("base model SHA-256", base_sha256 and base_sha256.lower(), info.base_sha256),
            ("key id", key_id, info.key_id),
        ):
            if want is not None and want != have:
                raise RegistryProductError(f"registry {url} is for {what} {have!r}, not {want!r}")
        return reg

    def _check_schema(self) -> None:
        with self._engine.connect() as conn:
            insp = sa.inspect(conn)
            if not insp.has_table("nnmark_meta"):
                raise RegistrySchemaError(f"{self.url} is not an nnmark registry (no nnmark_meta table)")
            meta = dict(conn.execute(sa.select(meta_table.c.key, meta_table.c.value)).all())
            if meta.get("format") != "nnmark-registry":
                raise RegistrySchemaError(f"{self.url} is not an nnmark registry")
            if meta.get("schema_version") != str(SCHEMA_VERSION):
                raise RegistrySchemaError(
                    f"registry schema version {meta.get('schema_version')} is not the supported {SCHEMA_VERSION}"
                )
            for table in metadata.sorted_tables:
                if not insp.has_table(table.name):
                    raise RegistrySchemaError(f"registry is missing table {table.name!r}")
                have = {c["name"] for c in insp.get_columns(table.name)}
                missing = [c.name for c in table.columns if c.name not in have]
                if missing:
                    raise RegistrySchemaError(f"registry table {table.name!r} lacks columns {missing}")

    def close(self) -> None:
        """Stop the heartbeat and release the database connections."""
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(5)
        self._engine.dispose()

    # -- leases -------------------------------------------------------------------
    def renew(self, token: str) -> bool:
        """Extend this issuer's lease on reservation ``token`` by ``lease_s`` from now; ``False`` when the lease
        is no longer this issuer's (the reservation was settled)."""
        now = time.time()
        with self._engine.begin() as conn:
            res = conn.execute(leases_table.update()
                               .where(leases_table.c.token == token, leases_table.c.holder == self.holder)
                               .values(expires_at=now + self.lease_s, renewed_at=now))
        return res.rowcount == 1

    def _beat(self) -> None:
        while not self._stop.wait(self.lease_s / 3.0):
            with self._held_lock:
                tokens = list(self._held)
            for token in tokens:
                try:
                    self.renew(token)
                except Exception:  # noqa: BLE001 - database unreachable: the lease lapses, as it should
                    pass

    def _hold(self, token: str) -> None:
        with self._held_lock:
            self._held.add(token)
            if self._heartbeat is None or not self._heartbeat.is_alive():
                self._stop.clear()
                self._heartbeat = threading.Thread(target=self._beat, name="nnmark-lease-heartbeat", daemon=True)
                self._heartbeat.start()

    def _release_hold(self, token: str) -> None:
        with self._held_lock:
            self._held.discard(token)

    def leases(self) -> dict[str, tuple[str, float]]:
        """``{token: (holder, expires_at)}`` of the reservations' leases."""
        if not self.leases_enabled:
            return {}
        with self._engine.connect() as conn:
            rows = conn.execute(sa.select(leases_table.c.token, leases_table.c.holder, leases_table.c.expires_at))
            return {t: (h, float(e)) for t, h, e in rows}

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- product and customers ----------------------------------------------------
    @property
    def product(self) -> ProductInfo:
        """The product this registry belongs to."""
        with self._engine.connect() as conn:
            row = conn.execute(sa.select(product_table).where(product_table.c.id == 1)).mappings().first()
        if row is None:
            raise RegistrySchemaError(f"{self.url} has no product record")
        return ProductInfo(
            row["name"], row["base_sha256"], row["key_id"], json.loads(row["code_family"]), row["created_at"]
        )

    def add_customers(self, customers: Iterable[str | tuple[str, str | None] | dict[str, Any]]) -> int:
        """Register customers: names, ``(name, community)`` pairs or dicts with ``name``, optional ``community``
        and ``community_code`` (e.g. a CRC bit string). Existing names are an error. Returns how many were added."""
        rows = []
        now = time.time()
        for c in customers:
            if isinstance(c, str):
                d: dict[str, Any] = {"name": c}
            elif isinstance(c, dict):
                d = dict(c)
            else:
                d = {"name": c[0], "community": c[1]}
            name = str(d.get("name", "")).strip()
            if not name:
                raise RegistryError("a customer needs a non-empty name")
            comm = d.get("community")
            rows.append(
                {
                    "name": name,
                    "community": None if comm is None else str(comm),
                    "community_code": d.get("community_code"),
                    "created_at": now,
                }
            )
        if not rows:
            return 0
        try:
            with self._engine.begin() as conn:
                conn.execute(customers_table.insert(), rows)
        except IntegrityError:
            raise RegistryError("some of these customer names are already registered") from None
        return len(rows)

    def _customer_query(self):
        c, k = customers_table, codes_table
        return sa.select(
            c.c.id, c.c.name, c.c.community, c.c.community_code, k.c.codebook, k.c.idx, k.c.state
        ).select_from(c.outerjoin(k, k.c.customer_id == c.c.id))

    def customers(self) -> list[Customer]:
        """All customers, in registration order, with the code each holds."""
        with self._engine.connect() as conn:
            rows = conn.execute(self._customer_query().order_by(customers_table.c.id)).all()
        return [Customer(*r) for r in rows]

    def customer(self, name: str) -> Customer:
        """One customer by name (:class:`RegistryError` if unknown)."""
        with self._engine.connect() as conn:
            row = conn.execute(self._customer_query().where(customers_table.c.name == name)).first()
        if row is None:
            raise RegistryError(f"unknown customer {name!r}")
        return Customer(*row)

    # -- issuing ------------------------------------------------------------------
    def reserve_code(
        self, customer: str, planned_path: str | os.PathLike | None = None, retries: int = 20
    ) -> Reservation:
        """Reserve a code for ``customer`` (atomic; see the module doc). A customer that already holds a code
        (from an earlier complete issue) gets the same code again; one with an issue in progress is refused.
        The reservation's lease (``lease_s``) is taken in the same transaction and renewed by this object's
        heartbeat until the issue is completed or aborted."""
        planned = None if planned_path is None else str(Path(planned_path).expanduser().resolve())
        c, k, i = customers_table, codes_table, issues_table
        for _ in range(max(1, retries)):
            try:
                with self._engine.begin() as conn:
                    cust = conn.execute(sa.select(c.c.id).where(c.c.name == customer)).first()
                    if cust is None:
                        raise RegistryError(f"unknown customer {customer!r}")
                    cid = cust[0]
                    held = conn.execute(
                        sa.select(k.c.id, k.c.codebook, k.c.idx, k.c.state).where(k.c.customer_id == cid)
                    ).first()
                    busy = conn.execute(
                        sa.select(i.c.id).where(i.c.customer_id == cid, i.c.status == "reserved").limit(1)
                    ).first()
                    if busy is not None or (held is not None and held.state != "assigned"):
                        raise RegistryError(f"customer {customer!r} already has an issue in progress")
                    if held is not None:
                        if held.state != "assigned":
                            raise RegistryError(f"customer {customer!r} already has an issue in progress")
                        code_id, codebook, idx = held.id, held.codebook, held.idx
                    else:
                        free = conn.execute(
                            sa.select(k.c.id, k.c.codebook, k.c.idx)
                            .where(k.c.customer_id.is_(None))
                            .order_by(k.c.rank)
                            .limit(1)
                        ).first()
                        if free is None:
                            raise RegistryError("no free code left in this registry")
                        res = conn.execute(
                            k.update()
                            .where(k.c.id == free.id, k.c.customer_id.is_(None))
                            .values(customer_id=cid, state="reserved")
                        )
                        if res.rowcount != 1:
                            raise _Retry()
                        code_id, codebook, idx = free.id, free.codebook, free.idx
                    token = uuid.uuid4().hex
                    now = time.time()
                    conn.execute(
                        i.insert().values(
                            token=token,
                            customer_id=cid,
                            code_id=code_id,
                            planned_path=planned,
                            status="reserved",
                            reserved_at=now,
                            host=socket.gethostname(),
                            pid=os.getpid(),
                        )
                    )
                    if self.leases_enabled:
                        conn.execute(leases_table.insert().values(token=token, holder=self.holder,
                                                                  expires_at=now + self.lease_s, renewed_at=now))
                if self.leases_enabled:
                    self._hold(token)
                return Reservation(token, customer, cid, codebook, int(idx), planned, now)
            except (_Retry, IntegrityError):
                time.sleep(0.01)
                continue
        raise RegistryError(f"could not reserve a code for {customer!r} after {retries} attempts (contention)")

    def _issue_row(self, conn: Connection, token: str):
        row = conn.execute(sa.select(issues_table).where(issues_table.c.token == token)).mappings().first()
        if row is None:
            raise RegistryError(f"unknown reservation {token}")
        return row

    def complete_issue(
        self, reservation: Reservation | str, model_path: str | os.PathLike, sha256: str, note: str | None = None
    ) -> IssuedCopy:
        """Record the model file of a reservation. The file must exist and hash to ``sha256`` (checked here),
        so a complete record never points to a missing or different file."""
        token = reservation.token if isinstance(reservation, Reservation) else str(reservation)
        path = Path(model_path).expanduser().resolve()
        if not path.is_file():
            raise RegistryError(f"model file not found: {path}")
        actual = _sha256_of(path)
        if actual != sha256.lower():
            raise RegistryError(f"model file {path} has SHA-256 {actual[:16]}..., not the given {sha256[:16]}...")
        return self._complete(token, str(path), actual, note)

    def _complete(self, token: str, path: str, sha: str, note: str | None) -> IssuedCopy:
        now = time.time()
        with self._engine.begin() as conn:
            row = self._issue_row(conn, token)
            if row["status"] != "reserved":
                raise RegistryError(f"reservation {token} is already {row['status']}")
            conn.execute(
                issues_table.update()
                .where(issues_table.c.token == token, issues_table.c.status == "reserved")
                .values(status="complete", model_path=path, model_sha256=sha, completed_at=now, note=note)
            )
            conn.execute(codes_table.update().where(codes_table.c.id == row["code_id"]).values(state="assigned"))
            self._drop_lease(conn, token)
        self._release_hold(token)
        return self.issued_copy(token)

    def _drop_lease(self, conn: Connection, token: str) -> None:
        if self.leases_enabled:
            conn.execute(leases_table.delete().where(leases_table.c.token == token))

    def abort(self, reservation: Reservation | str, note: str | None = None) -> None:
        """Give up a reservation: the code returns to the free pool unless the customer already holds it from
        an earlier complete issue. Files are not touched (the issuer removes its partial output)."""
        token = reservation.token if isinstance(reservation, Reservation) else str(reservation)
        with self._engine.begin() as conn:
            self._abort(conn, token, "aborted", note)
        self._release_hold(token)

    def _abort(self, conn: Connection, token: str, status: str, note: str | None) -> None:
        row = self._issue_row(conn, token)
        if row["status"] != "reserved":
            raise RegistryError(f"reservation {token} is already {row['status']}")
        conn.execute(
            issues_table.update()
            .where(issues_table.c.token == token)
            .values(status=status, completed_at=time.time(), note=note)
        )
        conn.execute(
            codes_table.update()
            .where(codes_table.c.id == row["code_id"], codes_table.c.state == "reserved")
            .values(customer_id=None, state="free")
        )
        self._drop_lease(conn, token)

    def issue_file(self, customer: str, path: str | os.PathLike,
                   write: Callable[[Reservation, Path], None], note: str | None = None) -> IssuedCopy:
        """The whole issuing protocol for one model file: reserve a code for ``customer`` (planned at ``path``),
        call ``write(reservation, path)`` (it must write the file, atomically), then complete the record with the
        file's SHA-256. On any error -- including ``KeyboardInterrupt`` -- the reservation is aborted and the
        partial file removed before the error propagates. Refuses an existing ``path``."""
        path = Path(path)
        if path.exists():
            raise RegistryError(f"{path} exists; refusing to overwrite an issued copy")
        res = self.reserve_code(customer, planned_path=path)
        try:
            write(res, path)
            return self._complete(res.token, str(path.expanduser().resolve()), _sha256_of(path), note)
        except BaseException:
            try:
                self.abort(res, note="issue failed")
            finally:
                path.unlink(missing_ok=True)
            raise

    def pending_customers(self, names: Iterable[str] | None = None) -> list[str]:
        """Customers (all, or those among ``names``, in that order) without a complete issued copy."""
        done = {c.customer for c in self.issued_copies()}
        pool = [c.name for c in self.customers()] if names is None else [str(n) for n in names]
        return [n for n in pool if n not in done]

    # -- look-ups -----------------------------------------------------------------
    def _copies_query(self):
        i, c, k = issues_table, customers_table, codes_table
        return (
            sa.select(
                i.c.token,
                c.c.name,
                k.c.codebook,
                k.c.idx,
                i.c.model_path,
                i.c.model_sha256,
                i.c.reserved_at,
                i.c.completed_at,
                i.c.note,
            )
            .select_from(i.join(c, c.c.id == i.c.customer_id).join(k, k.c.id == i.c.code_id))
            .where(i.c.status == "complete")
        )

    def issued_copy(self, token: str) -> IssuedCopy:
        """The complete issue with this reservation token."""
        with self._engine.connect() as conn:
            row = conn.execute(self._copies_query().where(issues_table.c.token == token)).first()
        if row is None:
            raise RegistryError(f"no complete issue {token}")
        return IssuedCopy(*row)

    def issued_copies(self, customer: str | None = None) -> list[IssuedCopy]:
        """Complete issues (all, or one customer's), oldest first."""
        q = self._copies_query().order_by(issues_table.c.id)
        if customer is not None:
            q = q.where(customers_table.c.name == customer)
        with self._engine.connect() as conn:
            return [IssuedCopy(*r) for r in conn.execute(q).all()]

    def find_by_sha256(self, sha256: str) -> IssuedCopy | None:
        """The issued copy whose file has this SHA-256 (e.g. a leaked file found verbatim)."""
        with self._engine.connect() as conn:
            row = conn.execute(self._copies_query().where(issues_table.c.model_sha256 == sha256.lower())).first()
        return None if row is None else IssuedCopy(*row)

    def lookup_by_code(self, code_index: int, codebook: str = "cic") -> Customer | None:
        """The customer holding code ``code_index`` (reserved or assigned), or ``None``."""
        k = codes_table
        with self._engine.connect() as conn:
            row = conn.execute(
                self._customer_query().where(k.c.codebook == codebook, k.c.idx == int(code_index))
            ).first()
        return None if row is None else Customer(*row)

    def assigned_codes(self, codebook: str = "cic", include_reserved: bool = False) -> dict[int, str]:
        """``{code index: customer name}`` for codes with a complete issue (and, optionally, reserved ones): the
        ``issued`` population a tracer decodes against."""
        k, c = codes_table, customers_table
        states = ["assigned", "reserved"] if include_reserved else ["assigned"]
        with self._engine.connect() as conn:
            rows = conn.execute(
                sa.select(k.c.idx, c.c.name)
                .select_from(k.join(c, c.c.id == k.c.customer_id))
                .where(k.c.codebook == codebook, k.c.state.in_(states))
            ).all()
        return {int(i): n for i, n in rows}

    def counts(self) -> dict[str, int]:
        """Numbers of customers, codes by state, and issues by status."""
        with self._engine.connect() as conn:
            out = {"customers": conn.execute(sa.select(sa.func.count()).select_from(customers_table)).scalar_one()}
            for state, n in conn.execute(sa.select(codes_table.c.state, sa.func.count()).group_by(codes_table.c.state)):
                out[f"codes_{state}"] = n
            for status, n in conn.execute(
                sa.select(issues_table.c.status, sa.func.count()).group_by(issues_table.c.status)
            ):
                out[f"issues_{status}"] = n
        return out


class _Retry(Exception):
    pass
