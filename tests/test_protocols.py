"""Black-box verification through standard inference protocols.

- a real third-party server: MLServer (a real subprocess) serving ONNX exports of a marked and of
  an independent clean CNN through a small onnxruntime runtime (tests/oip_onnx_runtime.py), spoken
  to with the Open Inference Protocol;
- ``nnmark serve --protocol oip`` (a real subprocess, verified with ``nnmark verify --protocol oip``),
  and the same server in a thread for its endpoints and refusals;
- a minimal independent server with only ``POST /predict`` and no ``/health`` (nnmark protocol),
  and a minimal server in TF-Serving's REST shape (NHWC inputs, logits);
- the wire formats' bounds (nnmark.serving.protocols), as pure functions.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
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
import onnxruntime as ort
import pytest
import requests
import torch
from torch import nn

from nnmark.errors import OracleError
from nnmark.io import save_model
from nnmark.schemes import load_scheme
from nnmark.serving import HTTPOracle, make_server
from nnmark.serving.protocols import (
    HEADER_LENGTH,
    OIPWire,
    ProtocolError,
    decode_tensors,
    fit_input,
    json_array,
    read_outputs,
    split_url_path,
)
from nnmark.tasks import ImageToImage

TESTS = Path(__file__).resolve().parent
START_TIMEOUT = 90.0
QUERIES = 50


# -- fixtures ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def owner(noise_marked, tmp_path_factory) -> dict:
    """The shared marked CNN on digits, saved as a model file, and its key written and committed
    (the scheme is loaded back from the key file: the shared fixture's object is left as it is)."""
    scheme, model = noise_marked
    d = tmp_path_factory.mktemp("owner")
    model_file = save_model(d / "marked.safetensors", model)
    scheme.save(d / "draft.key", commit=False)
    fresh = load_scheme(d / "draft.key")
    fresh.save(d / "owner.key", model_file=model_file, log=d / "commitments.db")
    return {"scheme": load_scheme(d / "owner.key", log=d / "commitments.db"), "model": model.eval(),
            "key": d / "owner.key", "model_file": model_file, "log": d / "commitments.db"}


@pytest.fixture(scope="module")
def marked(owner) -> tuple:
    """(scheme, marked model)."""
    return owner["scheme"], owner["model"]


@pytest.fixture(scope="module")
def clean(clean_models) -> nn.Module:
    """An independently trained CNN (another seed, no mark)."""
    return clean_models[("cnn", 1)].eval()


@pytest.fixture(scope="module")
def test_x(digits) -> torch.Tensor:
    return digits.test.x[:100]


def _local_labels(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1)


def _export(model: nn.Module, path: Path, example: torch.Tensor) -> Path:
    """ONNX export with a dynamic batch axis (input "input", output "output")."""
    try:
        from nnmark.targets.export import export_onnx
    except ImportError:  # the export helper is not there: the exporter itself
        torch.onnx.export(model, example, str(path), input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, dynamo=False)
        return path
    return export_onnx(model, path, example, dynamo=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """Stop the process group this test started (SIGTERM, then SIGKILL)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(15)


class _Thread:
    """A ThreadingHTTPServer with ``handler`` on a free loopback port, in a daemon thread."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def _json_reply(handler: BaseHTTPRequestHandler, status: int, payload: object) -> None:
    body = json.dumps(payload).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


# -- MLServer: a real Open Inference Protocol server -------------------------------------

@pytest.fixture(scope="module")
def mlserver(tmp_path_factory, marked, clean, digits) -> Iterator[dict]:
    """MLServer serving ONNX exports of the marked ("marked") and the clean ("clean") CNN."""
    import mlserver as mls

    d = tmp_path_factory.mktemp("mlserver")
    repo = d / "repo"
    example = digits.test.x[:2]
    onnx_files = {}
    for name, model in (("marked", marked[1]), ("clean", clean)):
        (repo / name).mkdir(parents=True)
        onnx_files[name] = _export(model, repo / name / "model.onnx", example)
        (repo / name / "model-settings.json").write_text(json.dumps(
            {"name": name, "implementation": "oip_onnx_runtime.OnnxModel", "parameters": {"uri": "./model.onnx"}}))
    port, grpc_port = _free_port(), _free_port()
    (repo / "settings.json").write_text(json.dumps(
        {"host": "127.0.0.1", "http_port": port, "grpc_port": grpc_port, "metrics_endpoint": None,
         "parallel_workers": 0, "debug": False}))
    exe = Path(sys.executable).with_name("mlserver")
    cmd = [str(exe)] if exe.exists() else [shutil.which("mlserver") or "mlserver"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    log = (d / "mlserver.log").open("w")
    started = time.monotonic()
    proc = subprocess.Popen([*cmd, "start", str(repo)], stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:  # ready when both models answer their readiness endpoint
            assert proc.poll() is None, (d / "mlserver.log").read_text()[-2000:]
            assert time.monotonic() - started < START_TIMEOUT, "MLServer did not become ready in time"
            try:
                if all(requests.get(f"{url}/v2/models/{n}/ready", timeout=2).status_code == 200 for n in onnx_files):
                    break
            except requests.exceptions.ConnectionError:
                pass
            time.sleep(0.2)
        yield {"url": url, "onnx": onnx_files, "version": mls.__version__,
               "startup_s": time.monotonic() - started}
    finally:
        _stop(proc)
        log.close()


def _ort_labels(path: Path, x: torch.Tensor) -> torch.Tensor:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    return torch.from_numpy(logits.argmax(1))


def test_mlserver_verifies_onnx_export_over_oip(mlserver, marked, test_x) -> None:
    """The marked CNN exported to ONNX behind MLServer is owned; the independent clean one is not."""
    scheme, _ = marked
    url = mlserver["url"]
    print(f"MLServer {mlserver['version']} ready after {mlserver['startup_s']:.1f} s")
    info = requests.get(url + "/v2", timeout=5).json()
    assert info["name"] == "mlserver" and "binary_tensor_data" not in info["extensions"]

    owned = HTTPOracle(url, protocol="oip", model_name="marked")
    verdict = scheme.verify(owned, queries=QUERIES)
    assert verdict.owned and verdict.p_value < 1e-6, verdict.summary()
    assert owned.queries_used == QUERIES and owned.wire.encoding == "json"  # MLServer lists no binary extension
    assert owned.wire.input.name == "input" and owned.wire.input.shape == [-1, 1, 8, 8]
    assert owned.wire.num_classes == 10
    # the labels are the ONNX model's own (scores -> arg-max), image for image
    assert torch.equal(owned(test_x), _ort_labels(mlserver["onnx"]["marked"], test_x))

    other = HTTPOracle(url + "/v2/models/clean", protocol="oip")  # the model named in the URL
    verdict = scheme.verify(other, queries=QUERIES)
    assert not verdict.owned and verdict.p_value > 1e-3, verdict.summary()
    assert torch.equal(other(test_x), _ort_labels(mlserver["onnx"]["clean"], test_x))


def test_mlserver_refuses_binary_tensors_and_client_falls_back(mlserver, test_x) -> None:
    url = mlserver["url"]
    # MLServer's REST front end has no binary tensors: 422, or 500 when the raw bytes are not UTF-8
    forced = HTTPOracle(url, protocol="oip", model_name="marked", binary=True, retries=0)
    with pytest.raises(OracleError, match="HTTP (422|500)"):
        forced(test_x[:4])
    assert forced.queries_used == 0
    auto = HTTPOracle(url, protocol="oip", model_name="marked")
    auto.probe()
    auto.wire._use_binary, auto.wire._confirmed = True, False  # as if /v2 had not listed the extensions
    labels = auto(test_x[:8])
    assert auto.wire.encoding == "json" and any("binary tensors refused" in n for n in auto.notes), auto.notes
    assert torch.equal(labels, _ort_labels(mlserver["onnx"]["marked"], test_x[:8]))
    assert auto.queries_used == 8 and auto.requests == 1
    with pytest.raises(OracleError, match="unknown-model.*HTTP 404"):
        HTTPOracle(url, protocol="oip", model_name="unknown-model", retries=0)(test_x[:2])


# -- nnmark serve --protocol oip ---------------------------------------------------------

def _wait_url(proc: subprocess.Popen) -> str:
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
    try:
        line = lines.get(timeout=START_TIMEOUT)
    except queue.Empty:
        raise AssertionError("server did not print its URL in time") from None
    m = re.search(r"http://127\.0\.0\.1:\d+", line)
    assert m and "/v2/models/marked" in line, (line, proc.poll())
    return m.group(0)


def _nnmark(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """Run the command line in process: (exit code, stdout, stderr)."""
    from nnmark.cli import main

    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def test_nnmark_serve_oip_and_verify_cli(capsys, owner, test_x) -> None:
    """`nnmark serve --protocol oip` in its own process; `nnmark verify --protocol oip` owns it."""
    model, path, key = owner["model"], owner["model_file"], owner["key"]
    proc = subprocess.Popen([sys.executable, "-m", "nnmark.cli", "serve", str(path), "--port", "0", "--protocol",
                             "oip"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        url = _wait_url(proc)
        for args in (["--url", url, "--protocol", "oip", "--model-name", "marked"],
                     ["--url", url + "/v2/models/marked/infer", "--protocol", "oip"],
                     ["--url", url]):  # nnmark's own /predict is served alongside
            code, out, err = _nnmark(capsys, "verify", *args, "--key", str(key), "--commitment-log",
                                     str(owner["log"]), "--budget", "20", "--json")
            assert code == 0, (out, err)
            v = json.loads(out)
            assert v["owned"] and v["details"]["queries_used"] == 20 and v["p_value"] < 1e-6
        code, out, err = _nnmark(capsys, "verify", "--url", url, "--protocol", "oip", "--key", str(key))
        assert code == 2 and err.startswith("error:") and "model's name" in err
        # binary tensors both ways by default; JSON on request; the same labels
        binary = HTTPOracle(url, protocol="oip", model_name="marked")
        as_json = HTTPOracle(url, protocol="oip", model_name="marked", binary=False)
        labels = binary(test_x)
        assert binary.wire.encoding == "binary" and as_json.wire.encoding == "json"
        assert torch.equal(labels, as_json(test_x)) and torch.equal(labels, _local_labels(model, test_x))
        # the nnmark protocol is still served alongside
        assert torch.equal(HTTPOracle(url)(test_x), labels)
    finally:
        _stop(proc)
        for stream in (proc.stdout, proc.stderr):
            stream.close()


@pytest.fixture(scope="module")
def oip_server(marked) -> Iterator[tuple[str, nn.Module]]:
    model = marked[1]
    srv = make_server(model, "127.0.0.1", 0, max_batch=16, protocol="oip", model_name="m")
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv.url, model
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(5)


def _infer(url: str, header: dict, raw: bytes = b"", binary: bool = True) -> requests.Response:
    head = json.dumps(header).encode()
    if not binary:
        return requests.post(url + "/v2/models/m/infer", data=head, timeout=10)
    return requests.post(url + "/v2/models/m/infer", data=head + raw, timeout=10,
                         headers={HEADER_LENGTH: str(len(head)), "Content-Type": "application/octet-stream"})


def test_oip_server_endpoints(oip_server, test_x) -> None:
    url, model = oip_server
    assert "binary_tensor_data" in requests.get(url + "/v2", timeout=5).json()["extensions"]
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/m/ready", "/v2/models/m/versions/1/ready"):
        assert requests.get(url + path, timeout=5).status_code == 200, path
    meta = requests.get(url + "/v2/models/m", timeout=5).json()
    assert meta["inputs"] == [{"name": "images", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert meta["outputs"] == [{"name": "label", "datatype": "INT64", "shape": [-1]}]
    x = test_x[:5].numpy()
    expected = _local_labels(model, test_x[:5]).tolist()
    tensor = {"name": "images", "datatype": "FP32", "shape": [5, 1, 8, 8]}
    r = _infer(url, {"inputs": [{**tensor, "data": x.ravel().tolist()}], "id": "q1"}, binary=False)
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/json"
    out = r.json()
    assert out["id"] == "q1" and out["outputs"][0]["data"] == expected and out["outputs"][0]["shape"] == [5]
    r = _infer(url, {"inputs": [{**tensor, "parameters": {"binary_data_size": x.nbytes}}],
                     "outputs": [{"name": "label", "parameters": {"binary_data": True}}]}, x.tobytes())
    assert r.status_code == 200 and HEADER_LENGTH in r.headers
    hlen = int(r.headers[HEADER_LENGTH])
    head = json.loads(r.content[:hlen])
    assert head["outputs"][0]["parameters"]["binary_data_size"] == 5 * 8 == len(r.content) - hlen
    assert np.frombuffer(r.content[hlen:], "<i8").tolist() == expected
    # a binary request is 4 bytes per value plus its JSON header
    req = OIPWire(model="m", input=None).encode(x)
    assert len(req.body) == int(req.headers[HEADER_LENGTH]) + x.size * 4


@pytest.mark.parametrize("header, raw, status, needle", [
    ({"inputs": [{"name": "images", "datatype": "FP32", "shape": [2, 1, 8, 8],
                  "parameters": {"binary_data_size": 100}}]}, b"\0" * 100, 400, "does not match shape"),
    ({"inputs": [{"name": "images", "datatype": "FP32", "shape": [2, 1, 8, 8],
                  "parameters": {"binary_data_size": 512}}]}, b"\0" * 600, 400, "left over"),
    ({"inputs": [{"name": "images", "datatype": "FP32", "shape": [2, 1, 8, 8],
                  "parameters": {"binary_data_size": 512}}]}, b"\0" * 100, 400, "512 binary bytes declared"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": [0.0] * 64}]}, None, 400,
     "unknown input 'x'"),
    ({"inputs": [{"name": "images", "datatype": "FP32", "shape": [17, 1, 8, 8], "data": [0.0] * 17 * 64}]}, None,
     413, "exceeds the limit of 16"),
    ({"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 1, 1 << 30, 1 << 30],
                  "parameters": {"binary_data_size": 4}}]}, b"\0" * 4, 413, "over the limit"),
    ({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1, 1, 8, 8], "data": ["a"] * 64}]}, None, 400,
     "unsupported datatype"),
    ({"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": [0.0] * 63}]}, None, 400,
     "63 values"),
    ({"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 1, 4, 4], "data": [0.0] * 16}]}, None, 400,
     "expected [N, 1, 8, 8]"),
    ({"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": [0.0] * 64}],
      "outputs": [{"name": "logits"}]}, None, 400, "unknown output 'logits'"),
])
def test_oip_server_refuses_malformed_requests(oip_server, header, raw, status, needle) -> None:
    url, _ = oip_server
    r = _infer(url, header, raw or b"", binary=raw is not None)
    assert r.status_code == status and needle in r.json()["error"], (r.status_code, r.text)
    assert requests.get(url + "/v2/health/ready", timeout=5).status_code == 200  # still serving


def test_oip_server_routes(oip_server) -> None:
    url, _ = oip_server
    assert requests.get(url + "/v2/models/other", timeout=5).status_code == 404
    assert requests.get(url + "/v2/models/m/versions/2", timeout=5).status_code == 404
    assert requests.get(url + "/v2/models/m/infer", timeout=5).status_code == 405
    assert requests.post(url + "/v2/models/m", json={}, timeout=5).status_code == 405
    assert requests.get(url + "/v2/nothing", timeout=5).status_code == 404
    r = requests.post(url + "/v2/models/m/infer", data=b'{"inputs": [NaN]}', timeout=5)
    assert r.status_code == 400 and "non-finite" in r.json()["error"]
    r = requests.post(url + "/v2/models/m/infer", data=b"{}", timeout=5,
                      headers={HEADER_LENGTH: "99"})
    assert r.status_code == 400 and "outside the body" in r.json()["error"]


class _Denoiser(nn.Module):
    """A user's image-to-image network (untrained: any fixed function will do)."""

    task = ImageToImage()

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.spec = {"in_shape": [1, 8, 8], "num_classes": 0, "arch": "denoiser"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.conv(x))


def test_oip_image_to_image_host(test_x) -> None:
    """An image-to-image host over OIP: the oracle answers the task's read-out (images), bit for bit."""
    model = _Denoiser().eval()
    srv = make_server(model, "127.0.0.1", 0, max_batch=32, protocol="oip", model_name="denoise")
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        meta = requests.get(srv.url + "/v2/models/denoise", timeout=5).json()
        assert meta["outputs"][0]["name"] == "image" and meta["outputs"][0]["datatype"] == "FP32"
        oracle = HTTPOracle(srv.url, protocol="oip", model_name="denoise", task="image-to-image", batch_size=40)
        out = oracle(test_x[:50])
        with torch.no_grad():
            expected = ImageToImage().read(model(test_x[:50]))
        assert out.dtype == torch.float32 and out.shape == (50, 1, 8, 8)
        # 40 + 10 images asked; the server (max batch 32, not advertised over OIP) answers 413 to the 40,
        # which the client splits into 20 + 20
        assert torch.equal(out, expected) and oracle.requests == 3
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(5)


# -- independent servers: nnmark's /predict without /health; TF-Serving's REST shape --------

def test_independent_predict_server_without_health(marked) -> None:
    """A server with only POST /predict (http.server answers 501 to GET) can be verified."""
    scheme, model = marked
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_POST(self) -> None:  # noqa: N802
            seen.append(self.path)
            images = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["images"]
            labels = _local_labels(model, torch.tensor(images, dtype=torch.float32)).tolist()
            _json_reply(self, 200, {"labels": labels})

    srv = _Thread(Handler)
    try:
        oracle = HTTPOracle(srv.url + "/predict")
        verdict = scheme.verify(oracle, queries=QUERIES)
        assert verdict.owned and verdict.p_value < 1e-6 and oracle.queries_used == QUERIES
        assert set(seen) == {"/predict"} and any("HTTP 501" in n for n in oracle.notes)
    finally:
        srv.close()


def test_tfserving_shaped_server(marked, clean) -> None:
    """TF-Serving's REST shape (NHWC signature, logits as predictions): owned vs clean."""
    scheme, model = marked
    models = {"marked": model, "clean": clean}
    shapes: list[tuple[int, ...]] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            m = re.fullmatch(r"/v1/models/(\w+)/metadata", self.path)
            if not m or m.group(1) not in models:
                return _json_reply(self, 404, {"error": "Could not find servable"})
            dims = [{"size": str(v)} for v in (-1, 8, 8, 1)]
            sig = {"inputs": {"x": {"dtype": "DT_FLOAT", "tensor_shape": {"dim": dims}}}}
            _json_reply(self, 200, {"metadata": {"signature_def": {"signature_def": {"serving_default": sig}}}})

        def do_POST(self) -> None:  # noqa: N802
            m = re.fullmatch(r"/v1/models/(\w+):predict", self.path)
            x = torch.tensor(json.loads(self.rfile.read(int(self.headers["Content-Length"])))["instances"])
            shapes.append(tuple(x.shape))
            with torch.no_grad():
                logits = models[m.group(1)](x.permute(0, 3, 1, 2).contiguous())
            _json_reply(self, 200, {"predictions": logits.tolist()})

    srv = _Thread(Handler)
    try:
        oracle = HTTPOracle(srv.url, protocol="tfserving", model_name="marked")
        verdict = scheme.verify(oracle, queries=QUERIES)
        assert verdict.owned and verdict.p_value < 1e-6 and oracle.wire.layout == "NHWC"
        assert shapes and all(s[1:] == (8, 8, 1) for s in shapes)
        verdict = scheme.verify(HTTPOracle(srv.url + "/v1/models/clean:predict", protocol="tfserving"),
                                queries=QUERIES)
        assert not verdict.owned
        with pytest.raises(OracleError, match="no binary tensors"):
            HTTPOracle(srv.url, protocol="tfserving", model_name="marked", binary=True)
    finally:
        srv.close()


# -- the wire formats, as pure functions ------------------------------------------------------

def test_fit_input_layouts() -> None:
    x = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    assert fit_input(x, None)[1] == "NCHW" and fit_input(x, [-1, 3, 4, 5])[1] == "NCHW"
    arr, layout = fit_input(x, [-1, 4, 5, 3])
    assert layout == "NHWC" and np.array_equal(arr, x.transpose(0, 2, 3, 1))
    assert fit_input(x, [-1, 60])[1] == "NF"
    assert fit_input(x[:, :1], [-1, 4, 5])[1] == "NHW"
    with pytest.raises(ProtocolError, match="does not fit"):
        fit_input(x, [-1, 3, 5, 4])


def test_read_outputs() -> None:
    logits = np.array([[0.1, 2.0, -1.0], [3.0, 0.0, 0.5]], dtype=np.float32)
    assert read_outputs(logits, 2, "classification").tolist() == [1, 0]
    assert read_outputs(np.array([[2], [0]]), 2, "classification").tolist() == [2, 0]
    assert read_outputs(np.array([2.0, 0.0]), 2, "classification").tolist() == [2, 0]
    for bad, needle in ((np.array([0.3, 0.9]), "labels"), (logits, "for 3 images"),
                        (np.array([[np.nan, 1.0]] * 2), "non-finite"), (np.array([5, 1]), "outside 0..2")):
        with pytest.raises(ProtocolError, match=needle):
            read_outputs(bad, 3 if needle == "for 3 images" else 2, "classification", num_classes=3)
    img = np.zeros((2, 4, 4, 1), dtype=np.float32)
    assert read_outputs(img, 2, "image-to-image", layout="NHWC").shape == (2, 1, 4, 4)
    with pytest.raises(ProtocolError, match="float images"):
        read_outputs(np.array([1, 2]), 2, "image-to-image")


def test_binary_tensors_are_checked_before_allocation() -> None:
    spec = {"name": "y", "datatype": "FP32", "shape": [2, 3], "parameters": {"binary_data_size": 24}}
    raw = memoryview(np.arange(6, dtype="<f4").tobytes())
    ((name, arr),) = decode_tensors([spec], raw, "outputs")
    assert name == "y" and arr.tolist() == [[0, 1, 2], [3, 4, 5]]
    cases = [({**spec, "shape": [2, 4]}, "does not match"), ({**spec, "shape": [1 << 40, 1 << 40]}, "over the limit"),
             ({**spec, "shape": [2, -3]}, "non-negative"), ({**spec, "datatype": "BF16"}, "unsupported"),
             ({**spec, "parameters": {"binary_data_size": True}}, "non-negative integer")]
    for bad, needle in cases:
        with pytest.raises(ProtocolError, match=needle):
            decode_tensors([bad], raw, "outputs")
    with pytest.raises(ProtocolError, match="left over"):
        decode_tensors([{**spec, "shape": [1, 3], "parameters": {"binary_data_size": 12}}], raw, "outputs")
    assert decode_tensors([{"name": "j", "datatype": "INT64", "shape": [2], "data": [1, 2]}], None,
                          "outputs")[0][1].dtype == np.int64


def test_json_floats_round_trip_exactly() -> None:
    x = np.random.default_rng(0).random((3, 1, 4, 4), dtype=np.float32)
    text = json_array(x)
    assert np.array_equal(np.asarray(json.loads(text), dtype=np.float32), x)
    assert len(text) < len(json.dumps(x.tolist()))


def test_split_url_path() -> None:
    assert split_url_path("/v2/models/m/versions/3/infer") == ("", "m", "3")
    assert split_url_path("/api/v1/models/my%20model:predict") == ("/api", "my model", None)
    assert split_url_path("/predict") == ("", None, None)
    assert split_url_path("/prefix/") == ("/prefix", None, None)
