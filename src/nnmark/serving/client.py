"""A budgeted HTTP client for a remote prediction API: :class:`HTTPOracle`.

It speaks the protocol of :mod:`nnmark.serving.server` (``POST /predict`` with
``{"images": [...]}`` -> ``{"labels": [...]}``) and behaves like any other
:class:`nnmark.oracle.Oracle`: ``oracle(x)`` for images ``x`` ``(N, C, H, W)``
returns int64 labels ``(N,)`` and counts the images it had answered.

Every network call has a timeout; connection errors, timeouts and 5xx answers are
retried with exponential backoff, 4xx answers never. Every failure is an
:class:`~nnmark.errors.OracleError` with a one-line message.
"""

from __future__ import annotations

import json
import time
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import requests
import torch

from nnmark.errors import OracleError
from nnmark.oracle import QueryBudgetExceeded

MAX_RESPONSE_BYTES = 8 << 20
MAX_HEALTH_BYTES = 1 << 20


class _Retryable(Exception):
    """A failure worth another attempt (connection, timeout, 5xx)."""


def _one_line(text: Any, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class HTTPOracle:
    """An oracle backed by an nnmark prediction server (or any API speaking its JSON).

    ``url``: the server's base URL (``http://host:port``; a trailing ``/predict``
    is accepted). ``budget``: most images that may be queried in total (``None``:
    unlimited); a call that would exceed it raises
    :class:`~nnmark.oracle.QueryBudgetExceeded` before anything is sent.
    ``timeout``: seconds allowed for each HTTP request as a whole (connect, send,
    answer). ``retries``: extra attempts after a connection error, timeout or 5xx
    answer (backoff ``backoff * 2**i`` seconds). ``batch_size``: most images per
    request (also capped by the server's advertised ``max_batch``).

    Counters: ``queries_used`` (images answered), ``requests`` (answered
    ``/predict`` requests), ``attempts`` (HTTP attempts, including retries).
    """

    def __init__(self, url: str, budget: int | None = None, timeout: float = 10.0, retries: int = 2,
                 batch_size: int = 64, backoff: float = 0.2) -> None:
        parts = urlsplit(url.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise OracleError(f"not an http(s) URL: {_one_line(url, 100)!r}")
        path = parts.path.rstrip("/")
        if path.endswith("/predict"):
            path = path[: -len("/predict")]
        self.base_url = f"{parts.scheme}://{parts.netloc}{path}"
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
        self._session = requests.Session()
        self._info: dict[str, Any] | None = None

    # -- public ---------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        """The server's ``GET /health`` answer (cached); ``{}`` if it has no such endpoint."""
        if self._info is None:
            status, payload = self._call("GET", "/health", None, MAX_HEALTH_BYTES)
            if status == 200 and isinstance(payload, dict):
                self._info = payload
            elif status in (404, 405):
                self._info = {}
            else:
                raise OracleError(self._http_error("GET /health", status, payload))
        return self._info

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Labels ``(N,)`` int64 for images ``x`` ``(N, C, H, W)`` (float, values in [0, 1])."""
        if x.ndim != 4:
            raise ValueError(f"images must have shape (N, C, H, W), got {tuple(x.shape)}")
        n = len(x)
        if self.budget is not None and self.queries_used + n > self.budget:
            raise QueryBudgetExceeded(
                f"query budget of {self.budget} images exceeded ({self.queries_used} used, {n} more requested)"
            )
        if n == 0:
            return torch.zeros(0, dtype=torch.long)
        info = self.health()
        limits = info.get("limits") if isinstance(info.get("limits"), dict) else {}
        step = self.batch_size
        if isinstance(limits.get("max_batch"), int) and limits["max_batch"] >= 1:
            step = min(step, limits["max_batch"])
        max_body = limits.get("max_body_bytes") if isinstance(limits.get("max_body_bytes"), int) else None
        arr = x.detach().to("cpu", torch.float32).numpy()
        out: list[int] = []
        for i in range(0, n, step):
            out.extend(self._predict_chunk(arr[i : i + step], max_body))
        return torch.tensor(out, dtype=torch.long)

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> HTTPOracle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------
    def _predict_chunk(self, arr: np.ndarray, max_body: int | None) -> list[int]:
        body = json.dumps({"images": arr.tolist()}, separators=(",", ":")).encode()
        if max_body is not None and len(body) > max_body and len(arr) > 1:
            half = len(arr) // 2  # split until each request fits the server's body limit
            return self._predict_chunk(arr[:half], max_body) + self._predict_chunk(arr[half:], max_body)
        status, payload = self._call("POST", "/predict", body, MAX_RESPONSE_BYTES)
        if status != 200:
            raise OracleError(self._http_error("POST /predict", status, payload))
        labels = payload.get("labels") if isinstance(payload, dict) else None
        if not isinstance(labels, list):
            raise OracleError(f"malformed answer from {self.base_url}/predict: no \"labels\" list")
        if len(labels) != len(arr):
            raise OracleError(f"malformed answer from {self.base_url}/predict: "
                              f"{len(labels)} labels for {len(arr)} images")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
            raise OracleError(f"malformed answer from {self.base_url}/predict: labels are not all integers")
        nc = (self._info or {}).get("num_classes")
        if isinstance(nc, int) and nc > 0 and any(not 0 <= v < nc for v in labels):
            raise OracleError(f"malformed answer from {self.base_url}/predict: label outside 0..{nc - 1}")
        self.queries_used += len(arr)
        self.requests += 1
        return labels

    def _http_error(self, what: str, status: int, payload: Any) -> str:
        detail = payload.get("error") if isinstance(payload, dict) else None
        text = f": {_one_line(detail)}" if detail else ""
        return f"{what} at {self.base_url} failed with HTTP {status}{text}"

    def _call(self, method: str, path: str, body: bytes | None, max_bytes: int) -> tuple[int, Any]:
        """One request with retries; returns (status, parsed JSON or None for a 4xx without JSON)."""
        url = self.base_url + path
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            self.attempts += 1
            try:
                return self._attempt(method, url, body, max_bytes)
            except _Retryable as exc:
                last = str(exc)
        raise OracleError(f"{method} {url} failed after {self.retries + 1} attempts: {last}")

    def _attempt(self, method: str, url: str, body: bytes | None, max_bytes: int) -> tuple[int, Any]:
        deadline = time.monotonic() + self.timeout
        headers = {"Content-Type": "application/json"} if body is not None else {}
        try:
            resp = self._session.request(method, url, data=body, headers=headers, timeout=self.timeout,
                                         stream=True, allow_redirects=False)
        except requests.exceptions.Timeout:
            raise _Retryable(f"timed out after {self.timeout:g} s") from None
        except requests.exceptions.ConnectionError as exc:
            raise _Retryable(f"cannot connect ({_connection_reason(exc)})") from None
        except requests.exceptions.RequestException as exc:
            raise OracleError(f"{method} {url} failed: {_one_line(exc)}") from None
        try:
            raw = self._read_limited(resp, deadline, max_bytes, url)
        finally:
            resp.close()
        status = resp.status_code
        if status >= 500:
            raise _Retryable(f"HTTP {status}")
        try:
            payload = json.loads(raw)
        except (ValueError, RecursionError):
            if status >= 400:
                return status, None
            raise OracleError(f"answer from {url} is not JSON (HTTP {status}, "
                              f"{resp.headers.get('Content-Type', 'no content type')})") from None
        return status, payload

    def _read_limited(self, resp: requests.Response, deadline: float, max_bytes: int, url: str) -> bytes:
        chunks, size = [], 0
        try:
            for chunk in resp.iter_content(65536):
                chunks.append(chunk)
                size += len(chunk)
                if size > max_bytes:
                    raise OracleError(f"answer from {url} is larger than {max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise _Retryable(f"answer not complete after {self.timeout:g} s")
        except requests.exceptions.Timeout:
            raise _Retryable(f"timed out after {self.timeout:g} s") from None
        except (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
            raise _Retryable(f"connection broken while reading the answer ({_connection_reason(exc)})") from None
        return b"".join(chunks)


def _connection_reason(exc: BaseException) -> str:
    """A short reason (refused, name not resolved, reset...) from requests' nested exceptions."""
    text = str(exc)
    for needle, reason in (("Connection refused", "connection refused"),
                           ("Name or service not known", "host name not resolved"),
                           ("nodename nor servname", "host name not resolved"),
                           ("Temporary failure in name resolution", "host name not resolved"),
                           ("Failed to resolve", "host name not resolved"),
                           ("Connection reset", "connection reset"),
                           ("RemoteDisconnected", "server closed the connection"),
                           ("timed out", "timed out")):
        if needle in text:
            return reason
    return _one_line(text, 120)
