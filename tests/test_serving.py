"""The HTTP prediction server (in a separate process) and the HTTPOracle client."""

from __future__ import annotations

import json
import pickle
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import requests
import torch

from nnmark.data import load_splits
from nnmark.errors import OracleError
from nnmark.io import load_model, save_model
from nnmark.models import model_spec
from nnmark.oracle import QueryBudgetExceeded
from nnmark.serving import HTTPOracle, ServeError, make_server
from nnmark.train import TrainConfig, predict, seeded_model, train

MAX_BATCH = 64
START_TIMEOUT = 90.0


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    splits = load_splits("digits")
    model = seeded_model(model_spec("mlp", splits.image_shape, splits.num_classes), 0)
    train(model, splits.train, TrainConfig(epochs=3, seed=0, progress=False))
    return save_model(tmp_path_factory.mktemp("serve") / "mlp.safetensors", model)


@pytest.fixture(scope="module")
def local_model(model_file: Path) -> torch.nn.Module:
    return load_model(model_file)[0]


@pytest.fixture(scope="module")
def test_x() -> torch.Tensor:
    return load_splits("digits").test.x


def _start(path: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "nnmark.serving", str(path), "--port", "0", "--threads", "1", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _wait_url(proc: subprocess.Popen) -> str:
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
    try:
        line = lines.get(timeout=START_TIMEOUT)
    except queue.Empty:
        raise AssertionError("server did not print its URL in time") from None
    assert "http://127.0.0.1:" in line, (line, proc.poll())
    return line.split("at ", 1)[1].split()[0]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


@pytest.fixture(scope="module")
def server(model_file: Path) -> Iterator[str]:
    proc = _start(model_file, "--max-batch", str(MAX_BATCH))
    try:
        yield _wait_url(proc)
    finally:
        _stop(proc)


def _raw(url: str, request: bytes, timeout: float = 10.0) -> tuple[int, dict]:
    """Send raw bytes, read the whole answer (the server closes after errors)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    return int(head.split()[1]), json.loads(body)


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 1 << 30


# -- the server ----------------------------------------------------------------------

def test_health(server: str) -> None:
    info = requests.get(server + "/health", timeout=10).json()
    assert info["status"] == "ok" and info["arch"] == "mlp"
    assert info["in_shape"] == [1, 8, 8] and info["num_classes"] == 10
    assert info["limits"]["max_batch"] == MAX_BATCH
    assert info["limits"]["max_body_bytes"] > MAX_BATCH * 64 * 20


def test_http_predictions_equal_local(server: str, local_model, test_x: torch.Tensor) -> None:
    oracle = HTTPOracle(server, batch_size=1000)  # capped by the server's max_batch
    labels = oracle(test_x)
    assert labels.dtype == torch.int64 and labels.shape == (len(test_x),)
    assert torch.equal(labels, predict(local_model, test_x))
    assert oracle.queries_used == len(test_x)
    assert oracle.requests == -(-len(test_x) // MAX_BATCH)
    # (N, H, W) is accepted for one-channel models
    r = requests.post(server + "/predict", json={"images": test_x[:5, 0].tolist()}, timeout=10)
    assert r.status_code == 200 and r.json()["labels"] == predict(local_model, test_x[:5]).tolist()


def test_oversized_batch_is_413(server: str) -> None:
    images = np.zeros((MAX_BATCH + 1, 1, 8, 8), dtype=int).tolist()
    r = requests.post(server + "/predict", json={"images": images}, timeout=10)
    assert r.status_code == 413 and "limit of 64" in r.json()["error"]
    ok = requests.post(server + "/predict", json={"images": images[:MAX_BATCH]}, timeout=10)
    assert ok.status_code == 200 and len(ok.json()["labels"]) == MAX_BATCH


def test_oversized_body_is_413_before_reading_it(server: str) -> None:
    limit = requests.get(server + "/health", timeout=10).json()["limits"]["max_body_bytes"]
    # Only the headers are sent: the answer must come without waiting for the body.
    head = f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: {limit + 1}\r\n\r\n".encode()
    status, payload = _raw(server, head, timeout=5)
    assert status == 413 and "exceeds the limit" in payload["error"]
    # An ordinary client that sends the whole oversized body also reads the 413.
    r = requests.post(server + "/predict", data=b" " * (limit + 1000), timeout=10)
    assert r.status_code == 413 and "error" in r.json()


def test_missing_content_length(server: str) -> None:
    status, payload = _raw(server, b"POST /predict HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 411 and "Content-Length" in payload["error"]
    status, _ = _raw(server, b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n")
    assert status == 400


_IMG = [[[0.5] * 8] * 8]


@pytest.mark.parametrize("body", [
    b"{not json",
    b"\xff\xfe",
    b"[" * 100_000,
    b"[1, 2]",
    b'{"pixels": []}',
    b'{"images": 3}',
    json.dumps({"images": [[[[0.0] * 8] * 8] * 3]}).encode(),  # 3 channels
    json.dumps({"images": [[[0.0] * 7] * 8]}).encode(),  # 8x7
    json.dumps({"images": [_IMG, [[[0.5] * 8] * 7]]}).encode(),  # ragged
    json.dumps({"images": [[[["a"] * 8] * 8]]}).encode(),
    json.dumps({"images": [[[[True] * 8] * 8]]}).encode(),
    json.dumps({"images": [[[[None] * 8] * 8]]}).encode(),
    json.dumps({"images": [[[[0.5] * 7 + [float("nan")]] + [[0.5] * 8] * 7]]}).encode(),
    json.dumps({"images": [[[[0.5] * 7 + [10**400]] + [[0.5] * 8] * 7]]}).encode(),
    json.dumps({"images": [[[[0.5] * 7 + [1e300]] + [[0.5] * 8] * 7]]}).encode(),  # inf as float32
    (b'{"images": [[[' + b",".join([b"[" + b",".join([b"1e999"] * 8) + b"]"] * 8) + b"]]]}"),
])
def test_malformed_requests_are_400(server: str, body: bytes) -> None:
    r = requests.post(server + "/predict", data=body, timeout=10)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert isinstance(error, str) and error and "\n" not in error


def test_unknown_path_and_wrong_method(server: str) -> None:
    r = requests.get(server + "/nope", timeout=10)
    assert r.status_code == 404 and "error" in r.json()
    r = requests.get(server + "/predict", timeout=10)
    assert r.status_code == 405 and r.headers["Allow"] == "POST" and "error" in r.json()
    r = requests.post(server + "/health", json={}, timeout=10)
    assert r.status_code == 405 and r.headers["Allow"] == "GET"
    r = requests.request("BREW", server + "/predict", timeout=10)
    assert r.status_code == 501 and "error" in r.json()
    assert requests.get(server + "/health", timeout=10).status_code == 200  # still serving


def test_concurrent_clients(server: str, local_model, test_x: torch.Tensor) -> None:
    expected = predict(local_model, test_x)
    failures: list[str] = []

    def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with HTTPOracle(server, timeout=30) as oracle:
            for _ in range(20):
                idx = torch.from_numpy(rng.choice(len(test_x), size=int(rng.integers(1, 17)), replace=False))
                try:
                    got = oracle(test_x[idx])
                except OracleError as exc:
                    failures.append(str(exc))
                    continue
                if not torch.equal(got, expected[idx]):
                    failures.append(f"client {seed}: wrong labels")
            if oracle.requests != 20:
                failures.append(f"client {seed}: {oracle.requests} requests answered")

    threads = [threading.Thread(target=client, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    assert failures == []


def test_make_server_in_process(local_model, test_x: torch.Tensor) -> None:
    srv = make_server(local_model, "127.0.0.1", 0, max_batch=8)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        assert srv.server_address[1] > 0
        oracle = HTTPOracle(srv.url)
        assert torch.equal(oracle(test_x[:20]), predict(local_model, test_x[:20]))
        assert oracle.requests == 3  # 8 + 8 + 4
        with pytest.raises(ServeError, match="cannot listen"):
            make_server(local_model, "127.0.0.1", srv.server_address[1])  # port taken
    finally:
        srv.shutdown()
        srv.server_close()
    thread.join(5)
    assert not thread.is_alive()


def test_client_splits_requests_to_fit_the_body_limit(local_model, test_x: torch.Tensor) -> None:
    x = test_x[:40] + 1e-3  # values with long decimal expansions
    srv = make_server(local_model, "127.0.0.1", 0, max_batch=64, max_body=20_000)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        body = json.dumps({"images": x.numpy().tolist()}, separators=(",", ":")).encode()
        assert requests.post(srv.url + "/predict", data=body, timeout=10).status_code == 413
        oracle = HTTPOracle(srv.url)
        assert torch.equal(oracle(x), predict(local_model, x))
        assert oracle.requests > len(body) // 20_000 and oracle.queries_used == 40
    finally:
        srv.shutdown()
        srv.server_close()


def test_sigterm_stops_cleanly(model_file: Path) -> None:
    proc = _start(model_file)
    try:
        url = _wait_url(proc)
        assert requests.get(url + "/health", timeout=10).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        _stop(proc)


def test_pickle_model_file_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "suspect.pt"
    bad.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    proc = _start(bad)
    try:
        out, err = proc.communicate(timeout=START_TIMEOUT)
    finally:
        _stop(proc)
    assert proc.returncode != 0
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "pickle" in lines[0]
    assert "http://" not in out


# -- the client ----------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_endpoint_fails_fast() -> None:
    oracle = HTTPOracle(f"http://127.0.0.1:{_free_port()}", retries=2, backoff=0.05, timeout=2)
    start = time.monotonic()
    with pytest.raises(OracleError) as err:
        oracle(torch.zeros(2, 1, 8, 8))
    assert time.monotonic() - start < 5
    message = str(err.value)
    assert "connection refused" in message and "3 attempts" in message and "\n" not in message
    assert oracle.attempts == 3 and oracle.queries_used == 0
    with pytest.raises(OracleError, match="not an http"):
        HTTPOracle("ftp://example.org")


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass  # the "slow" mode's client has gone away: a broken pipe is expected


class _Fake:
    """A tiny misbehaving API in a thread; ``mode`` selects how it answers /predict."""

    def __init__(self, mode: str) -> None:
        fake = self
        self.mode, self.hits = mode, 0

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802
                self._send(404, b"not here", "text/plain")

            def do_POST(self) -> None:  # noqa: N802
                fake.hits += 1
                n = len(json.loads(self.rfile.read(int(self.headers["Content-Length"])))["images"])
                answers = {
                    "html": (200, b"<html>hello</html>", "text/html"),
                    "nolabels": (200, b'{"result": []}', "application/json"),
                    "count": (200, json.dumps({"labels": [0] * (n + 1)}).encode(), "application/json"),
                    "floats": (200, json.dumps({"labels": [0.5] * n}).encode(), "application/json"),
                    "500": (500, b"oops", "text/plain"),
                    "400": (400, b'{"error": "images have the wrong shape"}', "application/json"),
                    "ok": (200, json.dumps({"labels": [1] * n}).encode(), "application/json"),
                }
                if fake.mode == "slow":
                    time.sleep(1.5)
                    self._send(200, json.dumps({"labels": [1] * n}).encode())
                    return
                self._send(*answers[fake.mode])

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def fake() -> Iterator[_Fake]:
    f = _Fake("ok")
    try:
        yield f
    finally:
        f.close()


@pytest.mark.parametrize("mode, needle, hits", [
    ("html", "not JSON", 1),
    ("nolabels", "no \"labels\"", 1),
    ("count", "3 labels for 2 images", 1),
    ("floats", "not all integers", 1),
    ("500", "HTTP 500", 3),  # retried
    ("400", "HTTP 400: images have the wrong shape", 1),  # never retried
    ("slow", "timed out", 3),
])
def test_client_rejects_bad_answers(fake: _Fake, mode: str, needle: str, hits: int) -> None:
    fake.mode = mode
    oracle = HTTPOracle(fake.url, retries=2, backoff=0.01, timeout=0.5)
    start = time.monotonic()
    with pytest.raises(OracleError) as err:
        oracle(torch.zeros(2, 1, 8, 8))
    assert time.monotonic() - start < 8
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert fake.hits == hits and oracle.queries_used == 0


def test_budget(fake: _Fake) -> None:
    oracle = HTTPOracle(fake.url, budget=20, batch_size=4)
    assert oracle(torch.zeros(15, 1, 8, 8)).tolist() == [1] * 15
    assert oracle.queries_used == 15 and oracle.requests == 4 and fake.hits == 4
    with pytest.raises(QueryBudgetExceeded):
        oracle(torch.zeros(6, 1, 8, 8))
    assert fake.hits == 4 and oracle.queries_used == 15  # nothing was sent
    assert len(oracle(torch.zeros(5, 1, 8, 8))) == 5 and oracle.queries_used == 20
