"""A budgeted HTTP client for a remote prediction API: :class:`HTTPOracle`.

It speaks one of the protocols of :mod:`nnmark.serving.protocols`: nnmark's own
(``POST /predict`` with ``{"images": [...]}`` -> ``{"labels": [...]}``, as served by
:mod:`nnmark.serving.server`), the Open Inference Protocol (KServe v2: Triton,
KServe, MLServer) or TF-Serving's REST API. It behaves like any other
:class:`nnmark.oracle.Oracle`: ``oracle(x)`` for images ``x`` ``(N, C, H, W)``
returns what the host's task reads (int64 labels ``(N,)`` for a classifier) and
counts the images it had answered. Probes (``GET /health``, model metadata) are
optional: whatever they answer, or if they are missing, the predictions are asked.

Every request has one overall deadline, ``timeout`` seconds for connecting,
sending, the answer's headers and its body together
(:func:`nnmark.serving.httpclient.fetch`), so a server that trickles its answer
cannot hold the client past it; answers are bounded in size (a larger
``Content-Length`` is refused before the body is read). Connection errors,
timeouts without any answer and 5xx answers are retried with exponential backoff;
4xx answers, and answers that started but did not complete in time, never. Every
failure is an :class:`~nnmark.errors.OracleError` with a one-line message.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import torch

from nnmark.errors import OracleError
from nnmark.oracle import QueryBudgetExceeded
from nnmark.safejson import JSONLimitError
from nnmark.safejson import loads as bounded_loads
from nnmark.serving.httpclient import (
    AnswerTooLarge,
    CannotConnect,
    ConnectionBroken,
    DeadlineExceeded,
    HTTPFailure,
    Response,
    fetch,
)
from nnmark.serving.protocols import ProtocolError, make_wire, read_outputs, split_url_path
from nnmark.tasks import Task, get_task

MAX_RESPONSE_BYTES = 8 << 20
MAX_HEALTH_BYTES = 1 << 20


class _Retryable(Exception):
    """A failure worth another attempt (connection, timeout, 5xx)."""


class _Unreachable(_Retryable):
    """No connection could be made (refused, host not resolved)."""


class EndpointUnreachable(OracleError):
    """Every attempt to connect failed: the server is not there."""


def _one_line(text: Any, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class HTTPOracle:
    """An oracle backed by a prediction server speaking ``protocol``.

    ``url``: the server's base URL (``http://host:port``; a trailing ``/predict``,
    ``/v2/models/NAME[/infer]`` or ``/v1/models/NAME[:predict]`` is accepted and names
    the model). ``protocol``: ``"nnmark"`` (default), ``"oip"`` (Open Inference
    Protocol) or ``"tfserving"``. ``model_name``: the served model's name (needed by
    ``oip`` and ``tfserving`` unless the URL names it). ``task``: how answers are read
    (default classification: labels, or the arg-max of scores). ``binary``: OIP tensor
    encoding (``None``: binary if the server accepts it, else JSON). ``output``: which
    output to read when the server answers several (default: the first).
    ``budget``: most images that may be queried in total (``None``:
    unlimited); a call that would exceed it raises
    :class:`~nnmark.oracle.QueryBudgetExceeded` before anything is sent.
    ``timeout``: seconds allowed for each HTTP request as a whole (connect, send,
    answer's headers and body: one deadline, however the server paces its bytes).
    A request whose answer started but was not complete in time is not retried.
    ``scores``: return the server's score rows ``(N, K)`` float64 (probabilities or logits) when it answers
    them -- the nnmark server's ``"probabilities"``, OIP / TF-Serving score outputs -- instead of their arg-max
    labels (labels still come back from a server that shows only labels).
    ``retries``: extra attempts after a connection error, timeout or 5xx
    answer (backoff ``backoff * 2**i`` seconds). ``batch_size``: most images per
    request (also capped by a batch limit the server advertises; a 413 answer
    splits the batch).

    Counters: ``queries_used`` (images answered), ``requests`` (answered
    prediction requests), ``attempts`` (HTTP attempts, including retries and probes).
    ``notes``: what the probes found or missed, and encoding fall-backs.
    """

    def __init__(self, url: str, budget: int | None = None, timeout: float = 10.0, retries: int = 2,
                 batch_size: int = 64, backoff: float = 0.2, *, protocol: str = "nnmark",
                 model_name: str | None = None, task: Task | str | None = None, binary: bool | None = None,
                 output: str | None = None, scores: bool = False) -> None:
        parts = urlsplit(url.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise OracleError(f"not an http(s) URL: {_one_line(url, 100)!r}")
        path, url_model, url_version = split_url_path(parts.path)
        self.base_url = f"{parts.scheme}://{parts.netloc}{path}"
        try:
            self.wire = make_wire(protocol, model_name or url_model, url_version, binary=binary, output=output)
        except ProtocolError as exc:
            raise OracleError(str(exc)) from None
        self.protocol = protocol
        self.task = get_task(task)
        self.scores = bool(scores) and self.task.name == "classification"
        if self.scores and hasattr(self.wire, "want_scores"):
            self.wire.want_scores = True
        if budget is not None and budget < 0:
            raise ValueError("budget must be >= 0")
        if timeout <= 0 or retries < 0 or batch_size < 1:
            raise ValueError("timeout must be > 0, retries >= 0, batch_size >= 1")
        self.budget = budget
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.batch_size = int(batch_size)
        self.backoff = float(backoff)
        self.queries_used = 0
        self.requests = 0
        self.attempts = 0
        self._probed = False

    @property
    def notes(self) -> list[str]:
        return self.wire.notes

    # -- public ---------------------------------------------------------------------
    def probe(self) -> None:
        """Send the protocol's optional probes once (server limits, model metadata).

        Any answer, or none, is fine: a missing endpoint, 404/405/501, a timeout, 5xx or
        malformed JSON only leaves the defaults (and a line in :attr:`notes`). Only a
        server that cannot be connected to at all raises :class:`EndpointUnreachable`.
        """
        if self._probed:
            return
        for path in self.wire.probes():
            try:
                status, headers, raw = self._call("GET", path, None, MAX_HEALTH_BYTES)
            except EndpointUnreachable:
                raise
            except OracleError as exc:
                self.wire.notes.append(f"GET {path}: {_one_line(exc)} (ignored)")
                continue
            self.wire.learn(path, status, headers, raw)
        self._probed = True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """What the task reads for images ``x`` ``(N, C, H, W)`` (float, values in [0, 1]):
        labels ``(N,)`` int64 for a classifier, float32 images for an image-to-image host."""
        if x.ndim != 4:
            raise ValueError(f"images must have shape (N, C, H, W), got {tuple(x.shape)}")
        n = len(x)
        if self.budget is not None and self.queries_used + n > self.budget:
            raise QueryBudgetExceeded(
                f"query budget of {self.budget} images exceeded ({self.queries_used} used, {n} more requested)"
            )
        if n == 0:
            return torch.zeros(0, dtype=torch.long)
        self.probe()
        step = min(self.batch_size, self.wire.max_batch or self.batch_size)
        arr = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        chunks = [self._predict_chunk(arr[i : i + step]) for i in range(0, n, step)]
        if len({c.ndim for c in chunks}) > 1 or len({c.shape[1:] for c in chunks}) > 1:
            raise OracleError(f"{self.base_url} answered scores to some requests and labels to others")
        out = torch.from_numpy(np.concatenate(chunks))
        return out if self.task.name == "classification" else self.task.read(out)  # labels are read already

    def close(self) -> None:
        """Nothing to release: every request has its own connection."""

    def __enter__(self) -> HTTPOracle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------
    def _predict_chunk(self, arr: np.ndarray) -> np.ndarray:
        """The answer for one batch, read for the task (split when the server's limits ask for it)."""
        try:
            req = self.wire.encode(arr)
        except ProtocolError as exc:
            raise OracleError(f"cannot query {self.base_url}: {exc}") from None
        max_body = self.wire.max_body
        if max_body is not None and len(req.body) > max_body and len(arr) > 1:
            return self._split(arr)  # until each request fits the server's body limit
        tentative = self.wire.tentative  # an encoding the server has not confirmed: one try, then fall back
        try:
            status, headers, raw = self._call("POST", req.path, req.body, MAX_RESPONSE_BYTES, req.headers,
                                              retries=0 if tentative else None)
        except EndpointUnreachable:
            raise
        except OracleError as exc:
            if tentative and self.wire.fall_back(0, _one_line(exc, 120)):
                return self._predict_chunk(arr)
            raise
        if status == 413 and len(arr) > 1:
            return self._split(arr)
        if status != 200:
            if self.wire.fall_back(status):  # e.g. binary tensors refused: send it again in JSON
                return self._predict_chunk(arr)
            raise OracleError(self._http_error(f"POST {req.path}", status, raw))
        try:
            answer = self.wire.decode(headers, raw, len(arr), MAX_RESPONSE_BYTES)
            if self.scores and answer.ndim == 2 and answer.shape[1] >= 2 and answer.dtype.kind == "f":
                if answer.shape[0] != len(arr) or not np.isfinite(answer).all():
                    raise ProtocolError(f"score rows of shape {list(answer.shape)} for {len(arr)} images, or not "
                                        "finite")
                out = answer.astype(np.float64)
            else:
                out = read_outputs(answer, len(arr), self.task.name, self.wire.layout, self.wire.num_classes)
        except ProtocolError as exc:
            ctype = headers.get("Content-Type", "no content type")
            raise OracleError(f"malformed answer from {self.base_url}{req.path} (HTTP {status}, {ctype}): "
                              f"{exc}") from None
        self.wire.confirm()
        self.queries_used += len(arr)
        self.requests += 1
        return out

    def _split(self, arr: np.ndarray) -> np.ndarray:
        half = len(arr) // 2
        return np.concatenate([self._predict_chunk(arr[:half]), self._predict_chunk(arr[half:])])

    def _http_error(self, what: str, status: int, raw: bytes) -> str:
        try:
            payload = bounded_loads(raw, max_bytes=MAX_HEALTH_BYTES, what="error answer")
        except JSONLimitError:
            payload = None
        detail = None
        if isinstance(payload, dict):  # nnmark, OIP, TF-Serving: "error"; FastAPI servers: "detail"
            detail = payload.get("error") or payload.get("detail")
        text = f": {_one_line(detail)}" if detail else ""
        return f"{what} at {self.base_url} failed with HTTP {status}{text}"

    def _call(self, method: str, path: str, body: bytes | None, max_bytes: int,
              headers: dict[str, str] | None = None, retries: int | None = None) -> tuple[int, Any, bytes]:
        """One request with ``retries`` (default: the oracle's); returns (status, response headers, body)."""
        url = self.base_url + path
        last, reachable = "", False
        retries = self.retries if retries is None else retries
        for attempt in range(retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            self.attempts += 1
            try:
                return self._attempt(method, url, body, max_bytes, headers)
            except _Retryable as exc:
                last = str(exc)
                reachable = reachable or not isinstance(exc, _Unreachable)
        error = OracleError if reachable else EndpointUnreachable
        raise error(f"{method} {url} failed after {retries + 1} attempts: {last}")

    def _attempt(self, method: str, url: str, body: bytes | None, max_bytes: int,
                 headers: dict[str, str] | None = None) -> tuple[int, Any, bytes]:
        """One HTTP request under one overall deadline of ``timeout`` s: (status, headers, body bytes)."""
        resp = _fetch(method, url, body, headers or {}, self.timeout, max_bytes)
        if resp.status >= 500:
            raise _Retryable(f"HTTP {resp.status}")
        return resp.status, resp.headers, resp.body


def _fetch(method: str, url: str, body: bytes | None, headers: dict[str, str], timeout: float,
           max_bytes: int) -> Response:
    """:func:`nnmark.serving.httpclient.fetch`, its failures sorted into retried and final ones."""
    try:
        return fetch(method, url, body, headers, timeout=timeout, max_bytes=max_bytes)
    except DeadlineExceeded as exc:
        if exc.received:  # it answers, but too slowly (a trickle): another attempt would do the same
            raise OracleError(f"{method} {url} failed: {exc}; not retried") from None
        raise _Retryable(str(exc)) from None
    except CannotConnect as exc:
        kind = _Unreachable if exc.reason in ("connection refused", "host name not resolved") else _Retryable
        raise kind(f"cannot connect ({exc.reason})") from None
    except ConnectionBroken as exc:
        raise _Retryable(str(exc)) from None
    except AnswerTooLarge as exc:
        raise OracleError(f"answer from {url} is too large: {exc}") from None
    except HTTPFailure as exc:
        raise OracleError(f"{method} {url} failed: {exc}") from None
