"""Crash recovery and consistency audit of a registry (a mixin of :class:`~nnmark.registry.store.Registry`).

A crash between reserving a code and completing its issue leaves a ``reserved`` row holding a code.
:meth:`RecoveryMixin.recover` finds reservations older than a limit whose issuer is gone -- its lease expired
(no heartbeat renewed it), or, on this host, its process is dead -- and either completes them (the planned
file exists and passes an optional ``verify`` callback) or releases the code, so no
code is lost; :meth:`RecoveryMixin.audit` lists what is inconsistent, one line each.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa

from nnmark.registry.records import RecoveryReport, RegistryError, Reservation
from nnmark.registry.schema import codes_table, customers_table, issues_table, leases_table


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


class RecoveryMixin:
    """``recover`` and ``audit``; the host class provides ``_engine``, ``_complete``, ``_abort`` and
    ``issued_copies``."""

    def recover(
        self,
        older_than_s: float = 3600.0,
        verify: Callable[[Path, Reservation], bool] | None = None,
        check_alive: bool = True,
    ) -> RecoveryReport:
        """Settle reservations left by crashed or killed issuers.

        A ``reserved`` issue older than ``older_than_s`` is settled unless (with ``check_alive``) its issuer
        may still be at work: its process is running on this host, or its lease has not expired (an issuer on
        any host renews its lease while it lives, see :mod:`nnmark.registry.store`); a reservation of a dead
        process on this host is settled at once, one without a lease (made before leases) by the process check
        alone. If its planned
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
        leases = self._lease_expiries([row["token"] for row in rows])
        now = time.time()
        completed, released, skipped = [], [], []
        for row in rows:
            local = row["host"] == host
            if check_alive and local and row["pid"] != os.getpid() and _pid_alive(row["pid"]):
                skipped.append(row["token"])
                continue
            dead_here = local and row["pid"] != os.getpid() and not _pid_alive(row["pid"])
            expiry = leases.get(row["token"])
            if check_alive and not dead_here and expiry is not None and expiry > now:
                skipped.append(row["token"])  # an issuer elsewhere still renews its lease
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

    def _lease_expiries(self, tokens: list[str]) -> dict[str, float]:
        if not tokens or not getattr(self, "leases_enabled", False):
            return {}
        out: dict[str, float] = {}
        with self._engine.connect() as conn:
            for start in range(0, len(tokens), 500):
                part = tokens[start:start + 500]
                for token, expiry in conn.execute(sa.select(leases_table.c.token, leases_table.c.expires_at)
                                                  .where(leases_table.c.token.in_(part))):
                    out[token] = float(expiry)
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
