"""A small, bounded HTTP prediction server for one classifier.

Endpoints (all bodies are JSON, every error is ``{"error": "<one line>"}``):

- ``GET /health`` -> ``{"status": "ok", "arch", "in_shape": [C, H, W], "num_classes",
  "limits": {"max_batch", "max_body_bytes"}}``;
- ``POST /predict`` with ``{"images": [...]}``, a batch of images as nested lists of
  shape ``(N, C, H, W)`` matching the model's ``in_shape`` (``(N, H, W)`` is accepted
  when ``C == 1``), finite numbers (pixel values in [0, 1] for nnmark's datasets) ->
  ``{"labels": [int, ...]}`` (``N`` labels); a server made with ``probabilities=True`` also answers
  ``"probabilities"``: ``N`` rows of the classifier's softmax (what an API that shows class scores gives).

With ``protocol="oip"`` the same server also speaks the Open Inference Protocol
(KServe v2 REST; the wire format is in :mod:`nnmark.serving.protocols`), for one
model named ``model_name``: ``GET /v2`` (server metadata, extensions
``["binary_tensor_data"]``), ``GET /v2/health/live`` and ``/v2/health/ready``,
``GET /v2/models/{name}[/versions/1]`` (metadata: input ``"images"`` FP32
``[-1, C, H, W]``; output ``"label"`` INT64 ``[-1]`` for a classifier, ``"image"``
FP32 for an image-to-image model), ``GET /v2/models/{name}/ready`` and
``POST /v2/models/{name}[/versions/1]/infer`` with the input in JSON ``data`` or as
a binary tensor (``Inference-Header-Content-Length``); the output comes back in
binary when the request asks for it (``binary_data_output`` or the output's
``binary_data``), else as JSON ``data``. The same bounds apply.

Bounds: a request declaring more than ``max_body_bytes`` (``Content-Length``) is
answered 413 before its body is read; a request without ``Content-Length`` gets
411; more than ``max_batch`` images gets 413; malformed JSON, a wrong shape,
non-numeric or non-finite values get 400; an unknown path 404; a wrong method 405.
Slow clients: connections are accepted and read by one selector loop
(:class:`nnmark.serving.gate.RequestGate`), which hands a request to a worker
thread only once its head and body have arrived. Each request must arrive within
``request_timeout`` seconds (default 10) of the moment the server started waiting
for it, whatever its per-byte rate: a slower one is answered 408 and dropped, an
idle connection closed; a body shorter than its ``Content-Length`` is answered 400
when the client ends it, 408 when it holds it open. At most ``max_connections``
connections (default 512) are held; at the limit the one that has waited longest
for its request makes room. So slow-loris connections cost a socket each, never
a worker, and never keep a normal client waiting. Workers (8) parse and validate
requests; the model's forward passes all run, one at a time, on a single
inference thread, which keeps torch's per-thread memory from growing with the
number of connections. Writing an answer to a client that does not read it gives
up after ``IDLE_TIMEOUT_S`` (15 s).
"""

from __future__ import annotations

import io
import json
import math
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nnmark.errors import NNMarkError
from nnmark.safejson import JSONLimitError
from nnmark.safejson import loads as safe_json_loads
from nnmark.serving.gate import RequestGate
from nnmark.serving.protocols import (
    PROTOCOLS,
    ProtocolError,
    TensorSpec,
    encode_infer_response,
    oip_model_metadata,
    oip_route,
    oip_server_metadata,
    parse_infer_request,
)
from nnmark.tasks import task_of

DEFAULT_MAX_BATCH = 256
# Bytes budgeted per pixel value in the JSON body: a float32 value written as a
# Python float takes at most ~24 characters plus a separator.
BYTES_PER_VALUE = 32
BODY_OVERHEAD = 64 << 10
DEFAULT_MAX_CONNECTIONS = 512
IDLE_TIMEOUT_S = 15.0  # socket timeout while writing an answer
DEFAULT_REQUEST_TIMEOUT_S = 10.0  # a request's head and body must arrive within this
DEFAULT_WORKERS = 8


class ServeError(NNMarkError):
    """The server could not start (e.g. the port is taken or the host is invalid)."""


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class PredictionServer(ThreadingHTTPServer):
    """A :class:`ThreadingHTTPServer` answering ``/health`` and ``/predict`` for one model.

    Build it with :func:`make_server`; run it with ``serve_forever()``; stop it with
    ``shutdown()`` (from another thread) and ``server_close()``.
    """

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], model: nn.Module, *, max_batch: int, max_body: int,
                 max_connections: int, verbose: bool, protocol: str = "nnmark", model_name: str = "model",
                 probabilities: bool = False) -> None:
        spec = getattr(model, "spec", None) or {}
        in_shape = spec.get("in_shape")
        if not (isinstance(in_shape, (list, tuple)) and len(in_shape) == 3):
            raise ServeError("model has no spec with in_shape [C, H, W]; build it with nnmark.models")
        self.model = model.eval()
        self.in_shape = tuple(int(v) for v in in_shape)
        self.num_classes = int(spec.get("num_classes", 0))
        self.arch = str(spec.get("arch", type(model).__name__))
        self.max_batch = int(max_batch)
        self.max_body = int(max_body)
        self.verbose = verbose
        self.oip = protocol == "oip"
        self.probabilities = bool(probabilities)
        self.model_name = model_name
        self.task = task_of(model)
        if self.probabilities and self.task.name != "classification":
            raise ServeError("only a classifier can show class probabilities")
        self._infer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nnmark-infer")
        self.max_connections = int(max_connections)
        self._gate: RequestGate | None = None
        self._handoff = threading.local()  # the request bytes the gate read, for the handler's rfile
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, _Handler)
        try:  # warm up (first-call allocations) before accepting requests
            self._infer.submit(self._read_out, np.zeros((1, *self.in_shape), dtype=np.float32)).result()
        except BaseException:
            self.server_close()
            raise

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:8000`` (IPv6 hosts in brackets)."""
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in str(host) else host
        return f"http://{host}:{port}"

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "arch": self.arch,
            "in_shape": list(self.in_shape),
            "num_classes": self.num_classes,
            "limits": {"max_batch": self.max_batch, "max_body_bytes": self.max_body},
        }

    def predict(self, images: np.ndarray) -> list[int]:
        """Labels for a validated float32 batch ``(N, C, H, W)``."""
        if len(images) == 0:
            return []
        return self._infer.submit(self._forward, images).result()

    def _forward(self, images: np.ndarray) -> list[int]:
        with torch.no_grad():
            labels = self.model(torch.from_numpy(images)).argmax(1)
        return [int(v) for v in labels.tolist()]

    def answer(self, images: np.ndarray) -> dict[str, Any]:
        """The ``/predict`` answer for a validated float32 batch: ``{"labels": [...]}``, with ``"probabilities"``
        (softmax rows) when the server shows them."""
        if not self.probabilities:
            return {"labels": self.predict(images)}
        if len(images) == 0:
            return {"labels": [], "probabilities": []}
        return self._infer.submit(self._forward_probabilities, images).result()

    def _forward_probabilities(self, images: np.ndarray) -> dict[str, Any]:
        with torch.no_grad():
            logits = self.model(torch.from_numpy(images))
        return {"labels": [int(v) for v in logits.argmax(1).tolist()],
                "probabilities": torch.softmax(logits.double(), 1).tolist()}

    # -- the Open Inference Protocol -----------------------------------------------------
    @property
    def oip_input(self) -> TensorSpec:
        return TensorSpec("images", "FP32", [-1, *self.in_shape])

    @property
    def oip_output(self) -> TensorSpec:
        if self.task.name == "classification":
            return TensorSpec("label", "INT64", [-1])
        return TensorSpec("image", "FP32", [-1, -1, -1, -1])

    def read_out(self, images: np.ndarray) -> np.ndarray:
        """What the model's task reads for a validated float32 batch ``(N, C, H, W)``:
        int64 labels ``(N,)`` for a classifier, float32 images otherwise."""
        return self._infer.submit(self._read_out, images).result()

    def _read_out(self, images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = self.task.read(self.model(torch.from_numpy(images)))
        return out.numpy().astype(np.int64 if self.task.name == "classification" else np.float32)

    # Connections go through the gate (see the module docstring), not socketserver's accept loop.
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Serve until :meth:`shutdown`: the gate accepts and buffers, workers answer complete requests."""
        self._the_gate().serve_forever(poll_interval)

    def shutdown(self) -> None:
        """Stop :meth:`serve_forever` (call from another thread) and wait until it has returned."""
        self._the_gate().shutdown()

    def _the_gate(self) -> RequestGate:
        if self._gate is None:
            log = (lambda line: print(f"nnmark serve: {line}", file=sys.stderr, flush=True)) if self.verbose else None
            self._gate = RequestGate(self.socket, self._serve_one, max_body=self.max_body,
                                     request_timeout=self.request_timeout, max_connections=self.max_connections,
                                     workers=DEFAULT_WORKERS, log=log)
        return self._gate

    def _serve_one(self, sock: socket.socket, address: tuple, request: bytes) -> bool:
        """Answer one complete request (a worker thread); True keeps the connection for the next one."""
        self._handoff.request = request
        try:
            handler = self.RequestHandlerClass(sock, address, self)
        except Exception:  # noqa: BLE001 - the client went away mid-answer, or a bug: drop this connection
            self.handle_error(sock, address)
            return False
        finally:
            self._handoff.request = None
        return not handler.close_connection

    def take_request(self) -> bytes | None:
        """The bytes the gate read for the request this thread is about to handle."""
        return getattr(self._handoff, "request", None)

    def server_close(self) -> None:
        if self._gate is not None:
            self._gate.close()  # closes the listening socket and every waiting connection
        super().server_close()
        self._infer.shutdown(wait=True)

    def handle_error(self, request, client_address) -> None:  # type: ignore[override]
        exc = sys.exc_info()[1]
        if self.verbose:
            print(f"nnmark serve: connection from {client_address[0]} failed: {_one_line(repr(exc))}",
                  file=sys.stderr, flush=True)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; every response carries Content-Length
    server_version = "nnmark-serve"
    timeout = IDLE_TIMEOUT_S  # socket timeout: idle keep-alive and slow bodies
    server: PredictionServer

    def version_string(self) -> str:
        return self.server_version

    # -- the gate hands over complete requests ----------------------------------------
    def setup(self) -> None:
        super().setup()  # the socket, with IDLE_TIMEOUT_S for writing the answer
        request = self.server.take_request()
        if request is not None:  # read from memory what the gate has buffered
            self.rfile.close()
            self.rfile = io.BytesIO(request)

    def handle(self) -> None:
        """One request per hand-over; the gate waits for the next one on a kept-alive connection."""
        self.close_connection = True
        self.handle_one_request()

    def handle_expect_100(self) -> bool:
        return True  # the gate answered 100 Continue when it waited for the body

    # -- responses -------------------------------------------------------------------
    def _send_json(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload, separators=(",", ":")).encode()
        self._send_bytes(status, body, {"Content-Type": "application/json", **(headers or {})})

    def _send_bytes(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        """Send ``body`` with ``headers`` (which name its Content-Type) and its Content-Length."""
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """JSON errors also for what BaseHTTPRequestHandler rejects itself (bad request line, 501...)."""
        if code >= 400:
            self.close_connection = True
        try:
            default = HTTPStatus(code).phrase
        except ValueError:
            default = "error"
        self._send_json(code, {"error": _one_line(message or default)})

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        if self.server.verbose:
            sys.stderr.write(f"{self.address_string()} - {format % args}\n")

    # -- routing ---------------------------------------------------------------------
    _ROUTES = {"/health": "GET", "/predict": "POST"}

    def _route(self, method: str) -> None:
        path = self.path.split("?", 1)[0]
        if self.server.oip and (path == "/v2" or path.startswith("/v2/")):
            self._route_oip(method, path)
            return
        allowed = self._ROUTES.get(path)
        if allowed is None:
            self._discard_and_close()
            self._send_json(404, {"error": f"unknown path {_one_line(path, 80)}; use GET /health or POST /predict"})
            return
        if method != allowed:
            self._discard_and_close()
            self._send_json(405, {"error": f"{method} not allowed on {path}; use {allowed}"}, {"Allow": allowed})
            return
        if path == "/health":
            self._send_json(200, self.server.health())
            return
        started = time.perf_counter()
        answer = self._guarded(self._predict)
        if answer is None:
            return
        if self.server.verbose:
            self.log_message("predicted %d images in %.1f ms", len(answer["labels"]),
                             1e3 * (time.perf_counter() - started))
        self._send_json(200, answer)

    def _route_oip(self, method: str, path: str) -> None:
        """The Open Inference Protocol's endpoints (see the module docstring)."""
        route = oip_route(path)
        if route is None:
            self._discard_and_close()
            self._send_json(404, {"error": f"unknown path {_one_line(path, 80)}"})
            return
        endpoint, name, version = route
        allowed = "POST" if endpoint == "infer" else "GET"
        if method != allowed:
            self._discard_and_close()
            self._send_json(405, {"error": f"{method} not allowed on {_one_line(path, 80)}; use {allowed}"},
                            {"Allow": allowed})
            return
        srv = self.server
        if name is not None and (name != srv.model_name or version not in (None, "1")):
            self._discard_and_close()
            self._send_json(404, {"error": f"unknown model {_one_line(name, 60)!r}"
                                           + (f" version {_one_line(version, 20)!r}" if version else "")
                                           + f"; this server has {srv.model_name!r} version 1"})
            return
        if endpoint == "server":
            self._send_json(200, oip_server_metadata(_version()))
        elif endpoint in ("live", "ready", "model-ready"):
            self._send_json(200, {"live" if endpoint == "live" else "ready": True})
        elif endpoint == "model":
            self._send_json(200, oip_model_metadata(srv.model_name, srv.oip_input, srv.oip_output))
        else:
            self._oip_infer()

    def _oip_infer(self) -> None:
        srv, started = self.server, time.perf_counter()
        req = self._guarded(lambda: parse_infer_request(
            self._read_body(), self.headers, input_name=srv.oip_input.name, in_shape=srv.in_shape,
            max_batch=srv.max_batch, output_name=srv.oip_output.name))
        values = None if req is None else self._guarded(lambda: srv.read_out(req.images))
        if values is None:
            return
        out, headers = encode_infer_response(srv.model_name, srv.oip_output.name, values,
                                             request_id=req.request_id, binary=req.binary_output)
        if srv.verbose:
            self.log_message("OIP infer: %d images in %.1f ms", len(req.images), 1e3 * (time.perf_counter() - started))
        self._send_bytes(200, out, headers)

    def _guarded(self, fn: Callable[[], Any]) -> Any:
        """``fn()``, or ``None`` after answering its failure: 4xx for the client's, 500 for a bug (then
        the server keeps serving)."""
        try:
            return fn()
        except _BadRequest as exc:
            self._send_json(exc.status, {"error": _one_line(exc.message)})
        except ProtocolError as exc:
            self._send_json(exc.status, {"error": _one_line(exc)})
        except Exception as exc:  # a bug, not the client's fault
            print(f"nnmark serve: internal error: {_one_line(repr(exc))}", file=sys.stderr, flush=True)
            self.close_connection = True
            self._send_json(500, {"error": "internal server error"})
        return None

    def _discard_and_close(self) -> None:
        """For requests we answer without reading their body: close the connection afterwards."""
        if self.headers.get("Content-Length") not in (None, "0") or self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            self._linger = True

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self._route("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._route("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._route("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._route("DELETE")

    def do_PATCH(self) -> None:  # noqa: N802
        self._route("PATCH")

    def do_HEAD(self) -> None:  # noqa: N802
        self._route("HEAD")

    def do_OPTIONS(self) -> None:  # noqa: N802
        self._route("OPTIONS")

    # -- /predict --------------------------------------------------------------------
    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise _BadRequest(411, "Content-Length required (chunked bodies are not supported)")
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            self.close_connection = True
            raise _BadRequest(411, "Content-Length required")
        try:
            length = int(length_text)
            if length < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise _BadRequest(400, f"invalid Content-Length {_one_line(length_text, 40)!r}") from None
        if length > self.server.max_body:
            self.close_connection = True
            self._linger = True
            raise _BadRequest(413, f"body of {length} bytes exceeds the limit of {self.server.max_body} bytes")
        body = self.rfile.read(length)
        if len(body) != length:
            self.close_connection = True
            raise _BadRequest(400, f"body ended after {len(body)} of {length} bytes")
        return body

    def _predict(self) -> dict[str, Any]:
        body = self._read_body()
        try:  # bounded depth and size; NaN / Infinity refused
            payload = safe_json_loads(body, max_bytes=max(self.server.max_body, 1), allow_constants=False,
                                      what="body")
        except JSONLimitError as exc:
            raise _BadRequest(400, _one_line(exc, 160)) from None
        if not isinstance(payload, dict) or "images" not in payload:
            raise _BadRequest(400, 'body must be a JSON object {"images": [...]}')
        images = payload["images"]
        if not isinstance(images, list):
            raise _BadRequest(400, '"images" must be a list of images')
        if len(images) > self.server.max_batch:
            raise _BadRequest(413, f"batch of {len(images)} images exceeds the limit of {self.server.max_batch}")
        return self.server.answer(self._to_array(images))

    def _to_array(self, images: list) -> np.ndarray:
        c, h, w = self.server.in_shape
        if not images:
            return np.zeros((0, c, h, w), dtype=np.float32)
        try:
            arr = np.asarray(images)
        except (ValueError, TypeError):  # ragged nesting
            raise _BadRequest(400, f"images must be a rectangular array of shape (N, {c}, {h}, {w})") from None
        if arr.dtype.kind not in "iuf":  # strings, booleans, null, objects, huge ints
            raise _BadRequest(400, "image values must be numbers")
        if arr.ndim == 3 and c == 1:
            arr = arr[:, None]
        if arr.shape[1:] != (c, h, w):
            raise _BadRequest(400, f"images have shape {tuple(arr.shape)}; expected (N, {c}, {h}, {w})"
                                   + (f" or (N, {h}, {w})" if c == 1 else ""))
        arr = arr.astype(np.float32)
        if not np.isfinite(arr).all():  # includes float64 values beyond float32's range
            raise _BadRequest(400, "image values must be finite")
        return np.ascontiguousarray(arr)

    def handle_one_request(self) -> None:
        self._linger = False
        super().handle_one_request()
        if self._linger:
            self._lingering_close()

    def _lingering_close(self, max_bytes: int = 16 << 20, max_seconds: float = 2.0) -> None:
        """After refusing a large body unread: stop sending, then discard (never store) what the
        client still sends, briefly, so it can read our 413 instead of a connection reset."""
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + max_seconds
            seen = 0
            while seen < max_bytes:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.connection.settimeout(left)
                chunk = self.connection.recv(65536)
                if not chunk:
                    break
                seen += len(chunk)
        except OSError:
            pass


def _version() -> str:
    from nnmark import __version__

    return str(__version__)


def default_max_body(in_shape: tuple[int, int, int] | list[int], max_batch: int) -> int:
    """Body limit (bytes) for ``max_batch`` images of ``in_shape`` written as JSON floats."""
    return int(max_batch) * math.prod(int(v) for v in in_shape) * BYTES_PER_VALUE + BODY_OVERHEAD


def make_server(
    model: nn.Module,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_body: int | None = None,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    verbose: bool = False,
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S,
    protocol: str = "nnmark",
    model_name: str = "model",
    probabilities: bool = False,
) -> PredictionServer:
    """Bind a :class:`PredictionServer` for ``model`` (built by nnmark, so it has ``.spec``).

    ``port=0`` picks a free port (read it from ``server.server_address[1]`` or
    ``server.url``). ``max_batch``: most images per request (default 256).
    ``max_body``: most body bytes (default :func:`default_max_body`, about
    ``max_batch * C*H*W * 32`` bytes). ``max_connections``: connections held at
    once (default 512; at the limit the one waiting longest for its request is
    dropped). ``request_timeout``: seconds a request's head and body may take to
    arrive (default 10; slower requests get 408). ``protocol``: ``"nnmark"`` (``/health``, ``/predict``) or ``"oip"``
    (those and the Open Inference Protocol's ``/v2`` endpoints for the model
    ``model_name``). ``probabilities``: ``/predict`` also answers the softmax rows. The server is bound but not
    running: call
    ``serve_forever()`` (e.g. in a thread), then ``shutdown()`` and ``server_close()``.
    Raises :class:`ServeError` if the address cannot be bound.
    """
    if max_batch < 1:
        raise ServeError(f"max_batch must be >= 1, got {max_batch}")
    if max_connections < 1:
        raise ServeError(f"max_connections must be >= 1, got {max_connections}")
    if not request_timeout > 0:
        raise ServeError(f"request_timeout must be > 0, got {request_timeout}")
    if protocol not in ("nnmark", "oip"):
        raise ServeError(f"cannot serve protocol {protocol!r}; choose nnmark or oip (known: {', '.join(PROTOCOLS)})")
    if not model_name or "/" in model_name or any(ch.isspace() or not ch.isprintable() for ch in model_name):
        raise ServeError(f"model name {model_name!r} must be non-empty, without '/', spaces or control characters")
    spec = getattr(model, "spec", None) or {}
    in_shape = spec.get("in_shape") or [1, 1, 1]
    body = default_max_body(in_shape, max_batch) if max_body is None else int(max_body)
    if body < 1:
        raise ServeError(f"max_body must be >= 1, got {body}")
    try:
        srv = PredictionServer((host, port), model, max_batch=max_batch, max_body=body,
                                max_connections=max_connections, verbose=verbose, protocol=protocol,
                                model_name=model_name, probabilities=probabilities)
    except OSError as exc:
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    srv.request_timeout = float(request_timeout)
    return srv


class _Stop(Exception):
    pass


def serve_model_file(
    path: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = DEFAULT_MAX_BATCH,
    verbose: bool = False,
    *,
    max_body: int | None = None,
    threads: int | None = None,
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    protocol: str = "nnmark",
    model_name: str | None = None,
    probabilities: bool = False,
) -> None:
    """Load a model file safely (:func:`nnmark.io.load_model`) and serve it until SIGINT/SIGTERM.

    Prints one line with the URL once it accepts connections (``port=0``: a free
    port, shown in that line). ``threads``: torch intra-op threads for the forward
    passes (default ``min(4, current setting)``). ``request_timeout``,
    ``max_connections``: see :func:`make_server`. ``protocol``: ``"nnmark"`` or ``"oip"``
    (see :func:`make_server`); ``model_name``: the OIP model name (default: the file's
    stem, e.g. ``stolen`` for ``stolen.safetensors``); ``probabilities``: ``/predict`` also answers the
    softmax rows. Raises
    :class:`~nnmark.errors.ModelFileError` for an unusable model file and
    :class:`ServeError` when the address cannot be bound; returns after a clean
    shutdown.
    """
    from nnmark.io import load_model

    path = Path(path)
    model, _meta = load_model(path)
    torch.set_num_threads(max(1, threads if threads is not None else min(4, torch.get_num_threads())))
    name = model_name or "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in path.stem) or "model"
    server = make_server(model, host, port, max_batch=max_batch, max_body=max_body, verbose=verbose,
                         request_timeout=request_timeout, max_connections=max_connections,
                         protocol=protocol, model_name=name, probabilities=probabilities)

    def _on_signal(signum: int, frame: Any) -> None:
        raise _Stop()

    in_main = threading.current_thread() is threading.main_thread()
    previous = {}
    if in_main:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, _on_signal)
    try:
        print(f"nnmark serve: {server.arch} model {path.name} at {server.url} "
              f"(max batch {server.max_batch}, max body {server.max_body} bytes)"
              + (f"; Open Inference Protocol model {name!r} at {server.url}/v2/models/{name}" if server.oip else "")
              + "; Ctrl-C to stop", flush=True)
        server.serve_forever(poll_interval=0.2)
    except (_Stop, KeyboardInterrupt):
        pass
    finally:
        server.server_close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("nnmark serve: stopped", file=sys.stderr, flush=True)
