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
:meth:`Registry.recover` finds reservations older than a limit whose process is
no longer alive, and either completes them (the planned file exists and passes
an optional ``verify`` callback) or releases the code -- so no code is lost.
A customer keeps its code for later copies (same fingerprint).

SQLite specifics: each transaction starts with ``BEGIN IMMEDIATE`` (the write
lock is taken up front, so concurrent issuers queue instead of failing to
upgrade a read lock) and waits up to ``busy_timeout_s`` for the lock.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, IntegrityError

from nnmark.errors import NNMarkError

SCHEMA_VERSION = 1


class RegistryError(NNMarkError):
    """A registry operation cannot be done (unknown customer, reservation already settled, ...)."""


class RegistryNotFoundError(RegistryError):
    """The registry database (file) does not exist."""


class RegistryProductError(RegistryError):
    """The registry belongs to another product or base model."""


class RegistrySchemaError(RegistryError):
    """The database is not an nnmark registry, or has another schema version."""


metadata = sa.MetaData()

meta_table = sa.Table(
    "nnmark_meta",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

product_table = sa.Table(
    "product",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("base_sha256", sa.String(64), nullable=False),
    sa.Column("key_id", sa.String(64), nullable=False),
    sa.Column("code_family", sa.Text, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)

customers_table = sa.Table(
    "customers",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(200), nullable=False, unique=True),
    sa.Column("community", sa.String(200), nullable=True),
    sa.Column("community_code", sa.String(200), nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
)

codes_table = sa.Table(
    "codes",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("codebook", sa.String(64), nullable=False),
    sa.Column("idx", sa.Integer, nullable=False),
    sa.Column("rank", sa.Integer, nullable=False),
    sa.Column("customer_id", sa.Integer, sa.ForeignKey("customers.id"), nullable=True, unique=True),
    sa.Column("state", sa.String(16), nullable=False),  # free | reserved | assigned
    sa.UniqueConstraint("codebook", "idx", name="uq_code"),
)
sa.Index("ix_codes_rank", codes_table.c.rank)

issues_table = sa.Table(
    "issues",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("token", sa.String(64), nullable=False, unique=True),
    sa.Column("customer_id", sa.Integer, sa.ForeignKey("customers.id"), nullable=False),
    sa.Column("code_id", sa.Integer, sa.ForeignKey("codes.id"), nullable=False),
    sa.Column("planned_path", sa.Text, nullable=True),
    sa.Column("model_path", sa.Text, nullable=True),
    sa.Column("model_sha256", sa.String(64), nullable=True),
    sa.Column("status", sa.String(16), nullable=False),  # reserved | complete | aborted | released
    sa.Column("reserved_at", sa.Float, nullable=False),
    sa.Column("completed_at", sa.Float, nullable=True),
    sa.Column("host", sa.String(200), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("note", sa.Text, nullable=True),
)
sa.Index("ix_issues_status", issues_table.c.status)


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


def _sha256_of(path: str | os.PathLike) -> str:
    from nnmark.io import file_sha256

    return file_sha256(path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Registry:
    """An issued-copies registry (use :meth:`create` or :meth:`open`; both take a database URL or a file path).

    ``busy_timeout_s``: how long an SQLite writer waits for the lock. Thread- and
    process-safe; keep one ``Registry`` per process.
    """

    def __init__(self, engine: Engine, url: str) -> None:
        self._engine = engine
        self.url = url

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
        return cls(engine, url)

    @classmethod
    def open(
        cls,
        url: str | os.PathLike,
        *,
        product: str | None = None,
        base_sha256: str | None = None,
        key_id: str | None = None,
        busy_timeout_s: float = 60.0,
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
        reg = cls(engine, url)
        try:
            reg._check_schema()
        except DBAPIError as exc:
            raise RegistrySchemaError(f"{url} is not a readable registry database ({exc.orig})") from None
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
        """Release the database connections."""
        self._engine.dispose()

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
        (from an earlier complete issue) gets the same code again; one with an issue in progress is refused."""
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
        return self.issued_copy(token)

    def abort(self, reservation: Reservation | str, note: str | None = None) -> None:
        """Give up a reservation: the code returns to the free pool unless the customer already holds it from
        an earlier complete issue. Files are not touched (the issuer removes its partial output)."""
        token = reservation.token if isinstance(reservation, Reservation) else str(reservation)
        with self._engine.begin() as conn:
            self._abort(conn, token, "aborted", note)

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

    def recover(
        self,
        older_than_s: float = 3600.0,
        verify: Callable[[Path, Reservation], bool] | None = None,
        check_alive: bool = True,
    ) -> RecoveryReport:
        """Settle reservations left by crashed or killed issuers.

        A ``reserved`` issue older than ``older_than_s`` is settled unless (with
        ``check_alive``) its process is still running on this host. If its planned
        file exists (and ``verify(path, reservation)`` returns true, when given --
        e.g. a check that the file carries the reserved fingerprint), the issue is
        completed with the file's SHA-256; otherwise it is released and the code
        returns to the pool (if the customer held it only through this issue).
        """
        cutoff = time.time() - older_than_s
        host = socket.gethostname()
        with self._engine.connect() as conn:
            rows = (
                conn.execute(
                    sa.select(issues_table, customers_table.c.name, codes_table.c.codebook, codes_table.c.idx)
                    .select_from(
                        issues_table.join(customers_table, customers_table.c.id == issues_table.c.customer_id).join(
                            codes_table, codes_table.c.id == issues_table.c.code_id
                        )
                    )
                    .where(issues_table.c.status == "reserved", issues_table.c.reserved_at <= cutoff)
                )
                .mappings()
                .all()
            )
        completed, released, skipped = [], [], []
        for row in rows:
            if check_alive and row["host"] == host and row["pid"] != os.getpid() and _pid_alive(row["pid"]):
                skipped.append(row["token"])
                continue
            res = Reservation(
                row["token"],
                row["name"],
                row["customer_id"],
                row["codebook"],
                int(row["idx"]),
                row["planned_path"],
                row["reserved_at"],
            )
            path = Path(row["planned_path"]) if row["planned_path"] else None
            usable = path is not None and path.is_file() and (verify is None or bool(verify(path, res)))
            try:
                if usable:
                    self._complete(res.token, str(path), _sha256_of(path), "recovered from an interrupted issue")
                    completed.append(res.token)
                else:
                    with self._engine.begin() as conn:
                        self._abort(conn, res.token, "released", "released by recover(): no model file")
                    released.append(res.token)
            except RegistryError:
                continue  # settled concurrently by someone else
        return RecoveryReport(tuple(completed), tuple(released), tuple(skipped))

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

    def audit(self, check_files: bool = False) -> list[str]:
        """Consistency problems, one line each (empty when sound): codes reserved without a pending issue,
        codes assigned without a complete issue, pending issues whose code is not held, and (``check_files``)
        complete issues whose file is missing or has another hash."""
        problems = []
        k, i = codes_table, issues_table
        with self._engine.connect() as conn:
            codes = conn.execute(sa.select(k.c.id, k.c.idx, k.c.state, k.c.customer_id)).all()
            issues = conn.execute(sa.select(i.c.token, i.c.code_id, i.c.customer_id, i.c.status)).all()
        pending = {(r.code_id, r.customer_id) for r in issues if r.status == "reserved"}
        done = {(r.code_id, r.customer_id) for r in issues if r.status == "complete"}
        for code in codes:
            key = (code.id, code.customer_id)
            if code.state == "free" and code.customer_id is not None:
                problems.append(f"code {code.idx} is free but bound to customer {code.customer_id}")
            if code.state == "reserved" and key not in pending:
                problems.append(f"code {code.idx} is reserved without a pending issue")
            if code.state == "assigned" and key not in done:
                problems.append(f"code {code.idx} is assigned without a complete issue")
        held = {(c.id, c.customer_id) for c in codes if c.state in ("reserved", "assigned")}
        for r in issues:
            if r.status in ("reserved", "complete") and (r.code_id, r.customer_id) not in held:
                problems.append(f"issue {r.token} ({r.status}) refers to a code its customer does not hold")
        if check_files:
            for copy in self.issued_copies():
                p = Path(copy.model_path)
                if not p.is_file():
                    problems.append(f"issued model file missing: {p}")
                elif _sha256_of(p) != copy.model_sha256:
                    problems.append(f"issued model file changed since issue: {p}")
        return problems


class _Retry(Exception):
    pass
