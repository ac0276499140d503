"""One HTTP/1.1 request under one overall deadline: :func:`fetch`.

A per-read socket timeout does not bound a request: a server that sends one byte
a second never lets a read time out. Here every step -- name resolution, connect,
TLS handshake, sending the request, the status line and headers, the body -- gets
only the time left until a single monotonic deadline, so the whole request ends
within ``timeout`` seconds (plus scheduling jitter) whatever the server does.

Sizes are bounded too: the status line and headers (``max_header_bytes``, default
64 KiB) and the body (``max_bytes``: a larger ``Content-Length`` is refused before
any body byte is read; chunked and close-delimited bodies are cut off at the cap).
One connection per request (``Connection: close``); no redirects, no proxies, no
content encodings (``Accept-Encoding: identity``).

Failures are one-line :class:`HTTPFailure` subclasses: :class:`DeadlineExceeded`
(``received``: answer bytes that had arrived), :class:`CannotConnect`,
:class:`ConnectionBroken`, :class:`AnswerTooLarge`, :class:`BadAnswer`.
"""

from __future__ import annotations

import ipaddress
import queue
import socket
import ssl
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

MAX_HEADER_BYTES = 64 << 10
MAX_HEADER_LINES = 200
_READ = 65536


class HTTPFailure(Exception):
    """A request that produced no usable answer (message: one line)."""


class DeadlineExceeded(HTTPFailure):
    """The overall deadline passed; ``received``: bytes of the answer that had arrived (0: none)."""

    def __init__(self, message: str, received: int) -> None:
        super().__init__(message)
        self.received = received


class CannotConnect(HTTPFailure):
    """No connection: ``reason`` is ``"connection refused"``, ``"host name not resolved"`` or another short text."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ConnectionBroken(HTTPFailure):
    """The connection closed or reset before the answer was complete."""


class AnswerTooLarge(HTTPFailure):
    """The answer's headers or body exceed their bounds."""


class BadAnswer(HTTPFailure):
    """The bytes are not an HTTP/1.x answer (or TLS failed)."""


class Headers(Mapping[str, str]):
    """Response headers, case-insensitive; repeated fields are joined with ``", "``."""

    def __init__(self, items: list[tuple[str, str]]) -> None:
        self._d: dict[str, tuple[str, str]] = {}
        for name, value in items:
            key = name.lower()
            if key in self._d:
                value = f"{self._d[key][1]}, {value}"
            self._d[key] = (name, value)

    def __getitem__(self, name: str) -> str:
        return self._d[name.lower()][1]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._d

    def __iter__(self) -> Iterator[str]:
        return (orig for orig, _ in self._d.values())

    def __len__(self) -> int:
        return len(self._d)

    def __repr__(self) -> str:
        return f"Headers({dict(self.items())!r})"


@dataclass(frozen=True)
class Response:
    """A complete answer: ``status`` (e.g. 200), ``reason``, ``headers``, ``body`` (bytes)."""

    status: int
    reason: str
    headers: Headers
    body: bytes


class _Conn:
    """A socket whose every blocking call waits at most until ``deadline``."""

    def __init__(self, sock: socket.socket, deadline: float, timeout: float) -> None:
        self.sock, self.deadline, self.timeout = sock, deadline, timeout
        self.buf = bytearray()
        self.received = 0

    def left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise self.expired()
        return left

    def expired(self) -> DeadlineExceeded:
        if self.received:
            return DeadlineExceeded(f"the answer was not complete within {self.timeout:g} s "
                                    f"({self.received} bytes had arrived)", self.received)
        return DeadlineExceeded(f"timed out after {self.timeout:g} s", 0)

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            self.sock.settimeout(self.left())
            try:
                n = self.sock.send(view)
            except TimeoutError:
                raise self.expired() from None
            view = view[n:]

    def fill(self) -> bool:
        """Read more into ``buf``; False at end of stream."""
        self.sock.settimeout(self.left())
        try:
            chunk = self.sock.recv(_READ)
        except TimeoutError:
            raise self.expired() from None
        except ssl.SSLError as exc:
            raise ConnectionBroken(f"TLS error while reading the answer ({_short(exc)})") from None
        except OSError as exc:
            raise ConnectionBroken(f"connection broken while reading the answer ({_reason(exc)})") from None
        if not chunk:
            return False
        self.received += len(chunk)
        self.buf += chunk
        return True

    def take(self, n: int) -> bytes:
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self.fill():
                raise ConnectionBroken(f"the server closed the connection {n - len(self.buf)} bytes short "
                                       "of the answer's length")
        return self.take(n)

    def read_line(self, limit: int) -> bytes:
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                return self.take(i + 1)
            if len(self.buf) > limit:
                raise AnswerTooLarge(f"a line of the answer is longer than {limit} bytes")
            if not self.fill():
                raise ConnectionBroken("the server closed the connection in the middle of the answer")


def _short(exc: BaseException, limit: int = 120) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, socket.gaierror):
        return "host name not resolved"
    return _short(exc)


def _resolve(host: str, port: int, deadline: float, timeout: float) -> list[tuple]:
    """getaddrinfo with the deadline (it has no timeout of its own: it runs in a helper thread)."""
    try:
        ipaddress.ip_address(host)
        literal = True
    except ValueError:
        literal = False
    if literal:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    answer: queue.Queue = queue.Queue(1)

    def work() -> None:
        try:
            answer.put(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as exc:
            answer.put(exc)

    threading.Thread(target=work, name="nnmark-resolve", daemon=True).start()
    try:
        result = answer.get(timeout=max(0.0, deadline - time.monotonic()))
    except queue.Empty:
        raise DeadlineExceeded(f"timed out after {timeout:g} s (resolving {host})", 0) from None
    if isinstance(result, OSError):
        raise CannotConnect("host name not resolved")
    return result


def _connect(host: str, port: int, deadline: float, timeout: float) -> socket.socket:
    last: BaseException | None = None
    for family, kind, proto, _, addr in _resolve(host, port, deadline, timeout):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(left)
            sock.connect(addr)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except TimeoutError as exc:
            last = exc
            sock.close()
        except OSError as exc:
            last = exc
            sock.close()
    if last is None or isinstance(last, TimeoutError):
        raise DeadlineExceeded(f"timed out after {timeout:g} s (connecting)", 0)
    raise CannotConnect(_reason(last))


def _parse_head(conn: _Conn, max_header_bytes: int) -> tuple[int, str, Headers]:
    """Status line and headers (1xx interim answers are skipped)."""
    while True:
        used = 0
        line = conn.read_line(max_header_bytes)
        used += len(line)
        parts = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not (parts[1].isdigit() and len(parts[1]) == 3):
            raise BadAnswer("the answer is not HTTP/1.x")
        status, reason = int(parts[1]), parts[2] if len(parts) > 2 else ""
        items: list[tuple[str, str]] = []
        while True:
            line = conn.read_line(max_header_bytes - used)
            used += len(line)
            if used > max_header_bytes or len(items) > MAX_HEADER_LINES:
                raise AnswerTooLarge(f"the answer's headers are larger than {max_header_bytes} bytes")
            text = line.decode("latin-1").rstrip("\r\n")
            if not text:
                break
            name, sep, value = text.partition(":")
            if not sep or not name or name != name.strip():
                raise BadAnswer("malformed header line in the answer")
            items.append((name, value.strip()))
        if not 100 <= status < 200:
            return status, reason, Headers(items)


def _read_body(conn: _Conn, method: str, status: int, headers: Headers, max_bytes: int) -> bytes:
    if method == "HEAD" or status in (204, 304):
        return b""
    te = headers.get("Transfer-Encoding", "")
    if te:
        if te.split(",")[-1].strip().lower() != "chunked":
            raise BadAnswer(f"unsupported Transfer-Encoding {te[:40]!r}")
        return _read_chunked(conn, max_bytes)
    length_text = headers.get("Content-Length")
    if length_text is not None:
        values = {v.strip() for v in length_text.split(",")}
        if len(values) != 1 or not next(iter(values)).isdigit():
            raise BadAnswer(f"invalid Content-Length {length_text[:40]!r}")
        length = int(next(iter(values)))
        if length > max_bytes:
            raise AnswerTooLarge(f"the answer declares {length} bytes; at most {max_bytes} are accepted")
        return conn.read_exact(length)
    while len(conn.buf) <= max_bytes and conn.fill():  # delimited by the end of the connection
        pass
    if len(conn.buf) > max_bytes:
        raise AnswerTooLarge(f"the answer is larger than {max_bytes} bytes")
    return conn.take(len(conn.buf))


def _read_chunked(conn: _Conn, max_bytes: int) -> bytes:
    out = bytearray()
    while True:
        line = conn.read_line(1024).split(b";", 1)[0].strip()
        try:
            size = int(line, 16)
        except ValueError:
            raise BadAnswer("malformed chunk in the answer") from None
        if size == 0:
            while conn.read_line(8192).strip():  # trailers
                pass
            return bytes(out)
        if len(out) + size > max_bytes:
            raise AnswerTooLarge(f"the answer is larger than {max_bytes} bytes")
        out += conn.read_exact(size)
        if conn.read_exact(2) != b"\r\n":
            raise BadAnswer("malformed chunk in the answer")


def fetch(method: str, url: str, body: bytes | None = None, headers: Mapping[str, str] | None = None, *,
          timeout: float, max_bytes: int, max_header_bytes: int = MAX_HEADER_BYTES,
          ssl_context: ssl.SSLContext | None = None) -> Response:
    """Send one request to ``url`` (``http://`` or ``https://``) and read its whole answer.

    ``timeout``: seconds for everything (resolve, connect, TLS, send, headers,
    body). ``max_bytes``: most body bytes accepted. ``headers``: extra request
    headers (``Host``, ``Content-Length``, ``Connection`` are set here). Raises an
    :class:`HTTPFailure` subclass; the socket is always closed.
    """
    deadline = time.monotonic() + float(timeout)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadAnswer(f"not an http(s) URL: {url[:100]!r}")
    host = parts.hostname
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise BadAnswer(f"invalid port in {url[:100]!r}") from None
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    netloc = parts.netloc.rsplit("@", 1)[-1]
    lines = [f"{method} {target} HTTP/1.1", f"Host: {netloc}", "User-Agent: nnmark",
             "Accept-Encoding: identity", "Connection: close"]
    for k, v in (headers or {}).items():
        if k.lower() not in ("host", "content-length", "connection", "transfer-encoding"):
            lines.append(f"{k}: {v}")
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")

    sock = _connect(host, port, deadline, timeout)
    try:
        if parts.scheme == "https":
            ctx = ssl_context or ssl.create_default_context()
            sock = ctx.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeadlineExceeded(f"timed out after {timeout:g} s (TLS handshake)", 0)
            sock.settimeout(left)  # the handshake keeps one deadline across its reads and writes
            try:
                sock.do_handshake()
            except TimeoutError:
                raise DeadlineExceeded(f"timed out after {timeout:g} s (TLS handshake)", 0) from None
            except ssl.SSLError as exc:
                raise BadAnswer(f"TLS handshake failed ({_short(exc)})") from None
        conn = _Conn(sock, deadline, timeout)
        try:
            conn.send(request)
        except OSError as exc:  # the server may have answered early (e.g. 413) and closed: read that
            broken = ConnectionBroken(f"connection broken while sending the request ({_reason(exc)})")
            try:
                status, reason, resp_headers = _parse_head(conn, max_header_bytes)
            except HTTPFailure:
                raise broken from None
        else:
            status, reason, resp_headers = _parse_head(conn, max_header_bytes)
        data = _read_body(conn, method, status, resp_headers, max_bytes)
        return Response(status, reason, resp_headers, data)
    finally:
        try:
            sock.close()
        except OSError:
            pass
