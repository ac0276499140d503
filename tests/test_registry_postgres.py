"""The registry under concurrent issuers, a SIGKILL and leases, on SQLite and on a real PostgreSQL server.

The PostgreSQL server is Debian's (``scripts/system-deps.sh`` installs it): a session fixture runs ``initdb``
into a temporary directory and ``pg_ctl`` with a Unix socket there (no TCP), as the unprivileged user
``nobody`` when the tests run as root (PostgreSQL refuses to run as root). Skipped with a message when the
binaries or the driver (``psycopg``) are missing.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from nnmark.registry import Registry
from nnmark.registry.schema import codes_table, issues_table

SHA = "0" * 64
pytestmark = pytest.mark.slow  # subprocess issuers and lease expiry: minutes on a loaded machine


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


@pytest.fixture(scope="session")
def pg_server():
    """``(socket dir, user)`` of a PostgreSQL server started for the session."""
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (run scripts/system-deps.sh)")
    pytest.importorskip("psycopg", reason="the PostgreSQL driver psycopg is missing (pip install nnmark[postgres])")
    root = Path(tempfile.mkdtemp(prefix="nnmark-pg-"))
    as_root = os.geteuid() == 0
    user = "nobody" if as_root else os.environ.get("USER", "postgres")
    if as_root:
        shutil.chown(root, user="nobody")
        os.chmod(root, 0o700)

    def run(*cmd: str) -> subprocess.CompletedProcess:
        full = ["runuser", "-u", "nobody", "--", *cmd] if as_root else list(cmd)
        return subprocess.run(full, capture_output=True, text=True, timeout=120, cwd=root)

    data = root / "data"
    r = run(str(bindir / "initdb"), "-D", str(data), "-U", user, "--auth=trust", "-E", "UTF8", "--no-sync")
    if r.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"initdb failed: {r.stderr.strip()[-300:]}")
    opts = f"-k {root} -c listen_addresses='' -c fsync=off -c max_connections=60"
    r = run(str(bindir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(root / "log"), "-w", "-t", "60", "start")
    if r.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"pg_ctl start failed: {r.stderr.strip()[-300:]}")
    try:
        yield root, user
    finally:
        run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


def _new_database(server) -> str:
    import psycopg

    sock, user = server
    name = f"reg_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(host=str(sock), user=user, dbname="postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"postgresql+psycopg://{user}@/{name}?host={sock}"


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    return _new_database(request.getfixturevalue("pg_server"))


WORKER = textwrap.dedent("""
    import sys, time, pathlib
    from nnmark.registry import Registry
    url, names, pause, out = sys.argv[1], sys.argv[2].split(","), float(sys.argv[3]), pathlib.Path(sys.argv[4])
    reg = Registry.open(url, lease_s=1.5)
    import hashlib
    for name in names:
        res = reg.reserve_code(name, planned_path=out / (name + ".bin"))
        print("RESERVED", name, res.code_index, flush=True)
        time.sleep(pause)
        path = out / (name + ".bin")
        path.write_bytes(name.encode())
        reg.complete_issue(res, path, hashlib.sha256(name.encode()).hexdigest())
        print("DONE", name, flush=True)
    print("FINISHED", flush=True)
""")


def _create(url: str, n_codes: int, customers: list[str]) -> Registry:
    reg = Registry.create(url, product="p", base_sha256=SHA, key_id="k" * 16, code_family={"family": "test"},
                          codes=n_codes, lease_s=1.5)
    reg.add_customers(customers)
    return reg


def test_concurrent_issuers_and_a_sigkill_lose_no_code_and_issue_none_twice(registry_url, tmp_path) -> None:
    groups = [[f"w{w}-c{i}" for i in range(4)] for w in range(3)]
    reg = _create(registry_url, 40, [n for g in groups for n in g])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, registry_url, ",".join(g), "30" if w == 0 else "0.05",
                               str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env)
             for w, g in enumerate(groups)]
    first = procs[0].stdout.readline().split()  # the victim has reserved its first code and is "fine-tuning"
    assert first[0] == "RESERVED"
    procs[0].send_signal(signal.SIGKILL)
    procs[0].wait(30)
    for p in procs[1:]:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0 and "FINISHED" in out
    # the killed issuer left one reservation; its process is dead on this host, so it is settled at once
    with reg._engine.connect() as conn:
        reserved = conn.execute(sa.select(sa.func.count()).select_from(issues_table)
                                .where(issues_table.c.status == "reserved")).scalar_one()
    assert reserved == 1
    rep = reg.recover(older_than_s=0)
    assert len(rep.released) == 1 and rep.completed == () and rep.skipped_alive == ()
    assert reg.audit(check_files=True) == []
    copies = reg.issued_copies()
    assert sorted(c.customer for c in copies) == sorted(n for g in groups[1:] for n in g)
    assert len({c.code_index for c in copies}) == len(copies)  # no code issued twice
    counts = reg.counts()
    assert counts["codes_assigned"] == 8 and counts["codes_free"] == 32 and counts.get("codes_reserved", 0) == 0
    # the released code is handed out again: the victim's customer gets a copy after the recovery
    res = reg.reserve_code(first[1], planned_path=tmp_path / "again.bin")
    (tmp_path / "again.bin").write_bytes(b"x")
    import hashlib

    reg.complete_issue(res, tmp_path / "again.bin", hashlib.sha256(b"x").hexdigest())
    assert reg.audit(check_files=True) == []
    reg.close()


def test_a_live_issuer_on_another_host_keeps_its_reservation_until_its_lease_lapses(registry_url, tmp_path) -> None:
    issuer = _create(registry_url, 5, ["remote-customer"])
    res = issuer.reserve_code("remote-customer", planned_path=tmp_path / "never-written.bin")
    # make the reservation look like another host's: its pid means nothing here, only the lease can tell
    with issuer._engine.begin() as conn:
        conn.execute(issues_table.update().where(issues_table.c.token == res.token)
                     .values(host="issuer-on-another-host", pid=999_999))
    recoverer = Registry.open(registry_url, lease_s=1.5)
    deadline = time.time() + 4.0  # well past the 1.5 s lease: the heartbeat (every 0.5 s) keeps it current
    while time.time() < deadline:
        rep = recoverer.recover(older_than_s=0)
        assert rep.released == () and rep.skipped_alive == (res.token,)
        time.sleep(0.4)
    issuer.close()  # the issuer dies: its heartbeat stops and nothing renews the lease
    time.sleep(2.0)
    rep = recoverer.recover(older_than_s=0)
    assert rep.released == (res.token,)
    with recoverer._engine.connect() as conn:
        state = conn.execute(sa.select(codes_table.c.state).where(codes_table.c.idx == res.code_index)).scalar_one()
    assert state == "free" and recoverer.audit() == []
    recoverer.close()
