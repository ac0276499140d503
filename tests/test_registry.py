"""Issued-copies registry: lifecycle, errors, and crash safety with real OS processes."""

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from nnmark.errors import NNMarkError
from nnmark.registry import (
    Registry,
    RegistryError,
    RegistryNotFoundError,
    RegistryProductError,
    RegistrySchemaError,
)

BASE = hashlib.sha256(b"base model").hexdigest()


def make(tmp_path, n_codes=20, name="reg.sqlite", **kw):
    return Registry.create(
        tmp_path / name,
        product="digits-cnn",
        base_sha256=BASE,
        key_id="0123456789abcdef",
        code_family={"family": "and-acc", "design": "AG(2,7)"},
        codes=n_codes,
        **kw,
    )


def write_model(path, content: bytes) -> str:
    path.write_bytes(content)
    return hashlib.sha256(content).hexdigest()


def test_lifecycle(tmp_path):
    reg = make(tmp_path)
    assert reg.product.name == "digits-cnn" and reg.product.code_family["design"] == "AG(2,7)"
    assert (
        reg.add_customers(["alice", ("bob", "c1"), {"name": "carol", "community": "c2", "community_code": "0101"}]) == 3
    )
    with pytest.raises(RegistryError):
        reg.add_customers(["alice"])
    res = reg.reserve_code("alice", planned_path=tmp_path / "alice.safetensors")
    assert res.code_index == 0
    with pytest.raises(RegistryError, match="in progress"):
        reg.reserve_code("alice")
    sha = write_model(tmp_path / "alice.safetensors", b"alice weights")
    with pytest.raises(RegistryError, match="SHA-256"):
        reg.complete_issue(res, tmp_path / "alice.safetensors", "0" * 64)
    with pytest.raises(RegistryError, match="not found"):
        reg.complete_issue(res, tmp_path / "missing.safetensors", sha)
    copy = reg.complete_issue(res, tmp_path / "alice.safetensors", sha)
    assert copy.customer == "alice" and copy.code_index == 0 and copy.model_sha256 == sha
    with pytest.raises(RegistryError, match="already complete"):
        reg.complete_issue(res, tmp_path / "alice.safetensors", sha)
    # bob: reserve then abort -> code 1 comes back
    rb = reg.reserve_code("bob")
    assert rb.code_index == 1
    reg.abort(rb)
    assert reg.customer("bob").code_index is None
    rc = reg.reserve_code("carol")
    assert rc.code_index == 1
    # alice again keeps her code (same fingerprint)
    ra = reg.reserve_code("alice")
    assert ra.code_index == 0
    reg.abort(ra)
    assert reg.customer("alice").code_index == 0 and reg.customer("alice").code_state == "assigned"
    assert reg.lookup_by_code(0).name == "alice" and reg.lookup_by_code(7) is None
    assert reg.assigned_codes() == {0: "alice"}
    assert reg.assigned_codes(include_reserved=True) == {0: "alice", 1: "carol"}
    assert reg.find_by_sha256(sha).customer == "alice"
    assert [c.name for c in reg.customers()] == ["alice", "bob", "carol"]
    assert reg.customers()[2].community == "c2"
    with pytest.raises(RegistryError, match="unknown customer"):
        reg.reserve_code("mallory")
    assert reg.audit(check_files=True) == []
    (tmp_path / "alice.safetensors").write_bytes(b"tampered")
    assert any("changed" in p for p in reg.audit(check_files=True))
    reg.close()


def test_codes_in_given_order_and_exhaustion(tmp_path):
    reg = Registry.create(tmp_path / "r.db", product="p", base_sha256=BASE, key_id="k", code_family={}, codes=[5, 3, 9])
    reg.add_customers(["a", "b", "c", "d"])
    assert [reg.reserve_code(n).code_index for n in "abc"] == [5, 3, 9]
    with pytest.raises(RegistryError, match="no free code"):
        reg.reserve_code("d")


def test_open_errors(tmp_path):
    with pytest.raises(RegistryNotFoundError):
        Registry.open(tmp_path / "nope.sqlite")
    make(tmp_path).close()
    with pytest.raises(RegistryError, match="already exists"):
        make(tmp_path)
    reg = Registry.open(tmp_path / "reg.sqlite", product="digits-cnn", base_sha256=BASE)
    assert reg.product.key_id == "0123456789abcdef"
    reg.close()
    with pytest.raises(RegistryProductError, match="product"):
        Registry.open(tmp_path / "reg.sqlite", product="other-product")
    with pytest.raises(RegistryProductError, match="SHA-256"):
        Registry.open(tmp_path / "reg.sqlite", base_sha256="f" * 64)
    # another SQLite database: not a registry
    other = tmp_path / "other.sqlite"
    con = sqlite3.connect(other)
    con.execute("create table t (x int)")
    con.commit()
    con.close()
    with pytest.raises(RegistrySchemaError, match="not an nnmark registry"):
        Registry.open(other)
    # a registry of another schema version
    con = sqlite3.connect(tmp_path / "reg.sqlite")
    con.execute("update nnmark_meta set value = '99' where key = 'schema_version'")
    con.commit()
    con.close()
    with pytest.raises(RegistrySchemaError, match="schema version 99"):
        Registry.open(tmp_path / "reg.sqlite")
    # not a database at all
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(RegistrySchemaError):
        Registry.open(junk)
    assert issubclass(RegistrySchemaError, NNMarkError)
    with pytest.raises(RegistryError, match="in-memory"):
        Registry.create("sqlite://", product="p", base_sha256=BASE, key_id="k", code_family={}, codes=3)


WORKER = textwrap.dedent(
    """
    import hashlib, sys, time
    from pathlib import Path
    from nnmark.registry import Registry
    url, prefix, n, outdir = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
    pause1, pause2 = float(sys.argv[5]), float(sys.argv[6])
    reg = Registry.open(url)
    for j in range(n):
        name = f"{prefix}{j}"
        path = outdir / f"{name}.bin"
        res = reg.reserve_code(name, planned_path=path)
        print("RESERVED", res.token, res.code_index, flush=True)
        time.sleep(pause1)
        data = f"{name}:{res.code_index}".encode()
        path.write_bytes(data)
        print("WRITTEN", res.token, flush=True)
        time.sleep(pause2)
        reg.complete_issue(res, path, hashlib.sha256(data).hexdigest())
        print("DONE", res.token, flush=True)
    """
)


def spawn(tmp_path, url, prefix, n, pause1=0.0, pause2=0.0):
    """An issuer process: for each customer, reserve / (pause1) / write the file / (pause2) / complete."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, str(url), prefix, str(n), str(tmp_path), str(pause1), str(pause2)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_concurrent_processes_never_share_a_code(tmp_path):
    n_proc, per = 3, 10
    reg = make(tmp_path, n_codes=n_proc * per + 5)
    reg.add_customers([f"p{i}_{j}" for i in range(n_proc) for j in range(per)])
    procs = [spawn(tmp_path, tmp_path / "reg.sqlite", f"p{i}_", per) for i in range(n_proc)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
    copies = reg.issued_copies()
    codes = [c.code_index for c in copies]
    assert len(copies) == n_proc * per
    assert len(set(codes)) == len(codes)  # no code handed out twice
    assert set(codes) == set(range(n_proc * per))  # and none skipped/lost
    assert reg.audit(check_files=True) == []


def _read_until(proc, word, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith(word):
            return line.split()
    raise AssertionError(f"worker never printed {word}: {proc.stderr.read()[-2000:]}")


@pytest.mark.parametrize("kill_after", ["RESERVED", "WRITTEN"])
def test_sigkill_between_reserve_and_complete_is_recoverable(tmp_path, kill_after):
    reg = make(tmp_path, n_codes=4)
    reg.add_customers(["k0", "other"])
    pauses = (30.0, 0.0) if kill_after == "RESERVED" else (0.0, 30.0)
    proc = spawn(tmp_path, tmp_path / "reg.sqlite", "k", 1, *pauses)
    token = _read_until(proc, kill_after)[1]
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    # the killed issue left a reservation and no complete record pointing anywhere
    assert reg.issued_copies() == [] and reg.counts()["issues_reserved"] == 1
    assert reg.recover(older_than_s=3600).completed == ()  # too young: untouched
    rep = reg.recover(older_than_s=0)
    assert reg.counts().get("issues_reserved", 0) == 0 and reg.audit(check_files=True) == []
    if kill_after == "RESERVED":  # no file: the code is released and handed out next
        assert rep.released == (token,)
        assert reg.customer("k0").code_index is None
        assert reg.reserve_code("other").code_index == 0
    else:  # the file exists: the issue is completed with its hash
        assert rep.completed == (token,)
        copy = reg.issued_copy(token)
        assert copy.code_index == 0 and os.path.exists(copy.model_path)
        assert reg.reserve_code("other").code_index == 1


def test_recover_skips_live_issuer_and_uses_verify(tmp_path):
    reg = make(tmp_path, n_codes=3)
    reg.add_customers(["a0", "b"])
    proc = spawn(tmp_path, tmp_path / "reg.sqlite", "a", 1, 0.0, 30.0)
    try:
        token = _read_until(proc, "WRITTEN")[1]
        assert reg.recover(older_than_s=0).skipped_alive == (token,)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    # the file exists but the verifier rejects it -> released, not completed
    rep = reg.recover(older_than_s=0, verify=lambda path, res: False)
    assert rep.released == (token,) and reg.issued_copies() == []
    assert reg.audit() == []


def test_random_kills_during_a_stream_of_issues_lose_nothing(tmp_path):
    """Kill issuers at random moments (possibly inside a transaction) until at least one issue has been
    interrupted; after recover() every code is either free or held by a customer with a verified model file."""
    import random

    rnd = random.Random(0)
    rounds, per = 10, 12
    reg = make(tmp_path, n_codes=rounds * per + 5)
    reg.add_customers([f"s{r}_{j}" for r in range(rounds) for j in range(per)])
    for r in range(rounds):
        proc = spawn(tmp_path, tmp_path / "reg.sqlite", f"s{r}_", per)
        _read_until(proc, "RESERVED")  # the stream has started
        time.sleep(rnd.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        if reg.counts().get("issues_reserved", 0) >= 1:
            break
    interrupted = reg.counts().get("issues_reserved", 0)
    reg.recover(older_than_s=0)
    assert reg.audit(check_files=True) == []
    counts = reg.counts()
    assert counts.get("issues_reserved", 0) == 0 and counts.get("codes_reserved", 0) == 0
    held = counts.get("codes_assigned", 0)
    assert held == len(reg.issued_copies()) and counts["codes_free"] == rounds * per + 5 - held
    assert held > 0
    # Whether a random kill lands inside an issue depends on machine load (on a busy machine every
    # kill fell between issues); the interrupted case itself is covered deterministically by
    # test_sigkill_between_reserve_and_complete_is_recoverable, so it is reported, not required.
    print(f"interrupted issues recovered: {interrupted}")
