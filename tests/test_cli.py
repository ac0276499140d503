"""The command line end to end: the user journey in this process (through the real entry point), hostile
files and servers in real subprocesses."""

from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from conftest import CliResult, run_cli

NNMARK = [sys.executable, "-m", "nnmark.cli"]


def run(*args: str, timeout: float = 300) -> CliResult:
    """``nnmark ARGS`` in this process (``timeout`` applies to :func:`run_proc` only)."""
    return run_cli(*args)


def run_proc(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``nnmark ARGS`` in a real subprocess (exit codes and tracebacks of a separate interpreter)."""
    return subprocess.run([*NNMARK, *args], capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess | CliResult, pattern: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    err = proc.stderr.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert re.search(pattern, err), err


@pytest.fixture(scope="module")
def journey(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    p = run("train", "--data", "digits", "--arch", "lenet5", "--epochs", "10", "--out", str(d / "clean.safetensors"))
    assert p.returncode == 0, p.stderr
    p = run("embed", "--data", "digits", "--arch", "cnn", "--epochs", "40", "--param", "generator=abstract",
            "--param", "n=60", "--key-seed", "cli-test", "--key-out", str(d / "owner.key"),
            "--out", str(d / "marked.safetensors"))
    assert p.returncode == 0, p.stderr
    return d


def test_verify_marked_and_clean(journey):
    d = journey
    p = run("verify", str(d / "marked.safetensors"), "--key", str(d / "owner.key"), "--json")
    assert p.returncode == 0, p.stderr
    v = json.loads(p.stdout)
    assert v["owned"] and v["p_value"] < 1e-6 and v["n"] == 20 and v["scheme"] == "trigger-abstract"
    assert {"alpha", "statistic", "null_hypothesis"} <= set(v)
    p = run("verify", str(d / "clean.safetensors"), "--key", str(d / "owner.key"), "--queries", "60", "--json")
    assert p.returncode == 1, p.stderr
    assert not json.loads(p.stdout)["owned"]
    # the secret never shows up in anything printed
    secret = json.loads((d / "owner.key").read_text())["secret"]
    assert secret not in p.stdout + p.stderr


def test_embed_commits_the_key(journey):
    """`embed` writes the public commitment record beside the key; it names the marked model file."""
    import hashlib

    d = journey
    rec = json.loads((d / "owner.key.commit.json").read_text())
    key = json.loads((d / "owner.key").read_text())
    assert rec["format"] == "nnmark-key-commitment" and rec["key_id"] == key["key_id"]
    assert rec["model_sha256"] == hashlib.sha256((d / "marked.safetensors").read_bytes()).hexdigest()
    assert key["secret"] not in json.dumps(rec) and (d / "commitments.db").is_file()
    # the clean model checked with the committed key: a valid commitment, and not owned
    p = run("verify", str(d / "clean.safetensors"), "--key", str(d / "owner.key"), "--json")
    v = json.loads(p.stdout)
    assert p.returncode == 1 and v["details"]["status"] == "committed" and not v["owned"]
    assert v["details"]["commitment"]["suspect_is_committed_model"] is False


def test_attack_then_verify(journey):
    d = journey
    p = run("attack", str(d / "marked.safetensors"), "--attack", "prune", "--param", "fraction=0.7",
            "--out", str(d / "pruned.safetensors"))
    assert p.returncode == 0, p.stderr
    p = run("attack", str(d / "marked.safetensors"), "--attack", "ftal", "--param", "epochs=5",
            "--out", str(d / "ftal.safetensors"))
    assert p.returncode == 0, p.stderr
    for name in ("pruned", "ftal"):
        p = run("verify", str(d / f"{name}.safetensors"), "--key", str(d / "owner.key"), "--queries", "60")
        assert p.returncode == 0, (name, p.stdout, p.stderr)
        assert "OWNED" in p.stdout


def _start_server(path):
    proc = subprocess.Popen([*NNMARK, "serve", str(path), "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    m = re.search(r"http://[\d.]+:\d+", line)
    assert m, (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc, m.group(0)


def test_verify_over_http(journey):
    d = journey
    proc, url = _start_server(d / "marked.safetensors")
    try:
        p = run("verify", "--url", url, "--key", str(d / "owner.key"), "--json", "--budget", "20")
        assert p.returncode == 0, p.stderr
        v = json.loads(p.stdout)
        assert v["owned"] and v["details"]["queries_used"] == 20 and v["p_value"] < 1e-6
        p = run("verify", "--url", url, "--key", str(d / "owner.key"), "--budget", "10")
        assert_one_line_error(p, "budget")
    finally:
        proc.terminate()
        proc.wait(10)


def test_bad_model_files(journey, tmp_path):
    key = str(journey / "owner.key")
    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    assert_one_line_error(run_proc("verify", str(evil), "--key", key), "pickle")  # a separate interpreter
    raw = (journey / "marked.safetensors").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(raw[: len(raw) // 2])
    assert_one_line_error(run("verify", str(cut), "--key", key), "truncated")  # the same entry point, in-process
    assert_one_line_error(run("verify", str(tmp_path / "none.safetensors"), "--key", key), "not found")
    # a model for 28x28 inputs does not fit a key made for 8x8 digits
    p = run("train", "--data", "digits28", "--arch", "mlp", "--epochs", "1", "--out", str(tmp_path / "m28.safetensors"))
    assert p.returncode == 0, p.stderr
    assert_one_line_error(run("verify", str(tmp_path / "m28.safetensors"), "--key", key), "does not fit|takes")


def test_bad_keys(journey, tmp_path):
    model = str(journey / "marked.safetensors")
    garbage = tmp_path / "garbage.key"
    garbage.write_text("hello")
    assert_one_line_error(run("verify", model, "--key", str(garbage)), "not an nnmark key file")
    assert_one_line_error(run("verify", model, "--key", str(tmp_path / "nokey")), "key file not found")
    doc = json.loads((journey / "owner.key").read_text())
    doc["scheme"] = "no-such-scheme"
    other = tmp_path / "other.key"
    other.write_text(json.dumps(doc))
    assert_one_line_error(run("verify", model, "--key", str(other)), "unknown scheme")


def test_unreachable_endpoint_fails_fast(journey):
    t0 = time.monotonic()
    p = run("verify", "--url", "http://127.0.0.1:9", "--key", str(journey / "owner.key"), "--timeout", "2",
            "--retries", "1", timeout=60)
    assert_one_line_error(p, "127.0.0.1:9")
    assert time.monotonic() - t0 < 30


class _Garbage(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        self._reply()

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._reply()

    def _reply(self):
        body = b"<html>definitely not json</html>"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


def test_malformed_endpoint(journey):
    srv = HTTPServer(("127.0.0.1", 0), _Garbage)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}"
        p = run("verify", "--url", url, "--key", str(journey / "owner.key"), "--timeout", "5", timeout=60)
        assert_one_line_error(p, "JSON|malformed|json")
    finally:
        srv.shutdown()


def test_usage_errors(journey):
    p = run("verify", "--key", str(journey / "owner.key"))
    assert_one_line_error(p, "exactly one")
    p = run("attack", str(journey / "marked.safetensors"), "--attack", "melt", "--out", "/tmp/x")
    assert_one_line_error(p, "unknown attack")
    p = run("train", "--data", "imagenet", "--out", "/tmp/x")
    assert_one_line_error(p, "unknown dataset")
