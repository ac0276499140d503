"""Admit HTTP requests to worker threads only once they have fully arrived: :class:`RequestGate`.

A thread per connection lets any client hold a thread for as long as it keeps
sending a byte now and then: 80 connections sending one byte every 5 s held all
of a 64-thread server's slots and no one else was answered. Here one selector
loop accepts connections and buffers each request's head and body without
blocking; a connection costs a socket and its buffer, not a thread. A request
goes to a worker thread only once it is complete, and every request must
complete within ``request_timeout`` seconds of the moment the gate started
waiting for it (the connection's accept, or the end of the previous answer on a
kept-alive connection): a slow client is answered 408 and dropped, an idle one
is closed, whatever its per-byte rate.

Framing (what the gate reads before handing over): the head up to the empty line
(at most ``max_header_bytes``, else 431); then, if ``Content-Length`` is a valid
number not above ``max_body``, that many body bytes (``Expect: 100-continue`` is
answered here). A request without a body, with ``Transfer-Encoding``, with an
invalid or too large ``Content-Length`` is handed over at the end of its head, so
that the handler can refuse it (411, 400, 413) without waiting for the body. A
client that closes its side in the middle of the body is handed what it sent
(the handler answers 400). Bodies waiting in the gate reserve their declared
length against ``max_pending_bytes``; a request that would exceed it gets 503.

At most ``max_connections`` connections are held; when a new one arrives at the
limit, the oldest connection still waiting for its request is dropped to make
room (normal clients complete their request in milliseconds; what waits longest
is the slowest), and if every connection is busy the new one gets 503.
"""

from __future__ import annotations

import json
import selectors
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus

#: ``handle(sock, address, request_bytes) -> keep_alive``: serve one complete request on a blocking
#: socket; return True to hand the connection back to the gate for its next request.
Handler = Callable[[socket.socket, tuple, bytes], bool]

_ACCEPT_BURST = 64
_TICK_S = 0.05  # deadline resolution


class _Conn:
    __slots__ = ("sock", "addr", "buf", "deadline", "started", "head_end", "need", "reserved", "continued",
                 "closed")

    def __init__(self, sock: socket.socket, addr: tuple, now: float, timeout: float) -> None:
        self.sock, self.addr = sock, addr
        self.buf = bytearray()
        self.closed = False
        self.reset(now, timeout)

    def reset(self, now: float, timeout: float) -> None:
        self.started, self.deadline = now, now + timeout
        self.head_end = -1  # index just past the head's empty line, once found
        self.need = -1  # bytes of the request (head + body) to wait for, once known
        self.reserved = 0
        self.continued = False


def _find_head_end(buf: bytearray, start: int) -> int:
    """Index just past the empty line ending the head, or -1."""
    i = buf.find(b"\r\n\r\n", start)
    j = buf.find(b"\n\n", start)
    ends = [k + 4 for k in (i,) if k >= 0] + [k + 2 for k in (j,) if k >= 0]
    return min(ends) if ends else -1


def _framing(head: bytes, max_body: int) -> tuple[int, bool]:
    """(body bytes to wait for, client expects 100-continue) from a request head."""
    length, te, expect = None, False, False
    for line in head.split(b"\n")[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        key = name.strip().lower()
        if key == b"content-length":
            v = value.strip()
            if length is not None and v != length:
                return 0, False  # conflicting lengths: the handler refuses the request
            length = v
        elif key == b"transfer-encoding":
            te = True
        elif key == b"expect":
            expect = value.strip().lower() == b"100-continue"
    if te or length is None or not length.isdigit() or int(length) > max_body:
        return 0, False  # handed over at the end of its head: the handler refuses or needs no body
    return int(length), expect


def _answer(status: int, message: str) -> bytes:
    body = json.dumps({"error": message}).encode()
    phrase = HTTPStatus(status).phrase
    return (f"HTTP/1.1 {status} {phrase}\r\nServer: nnmark-serve\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


class RequestGate:
    """One selector loop that accepts connections on ``listener`` and buffers requests; complete
    requests run ``handle`` on ``workers`` threads.

    ``request_timeout``: seconds a request (head and body) may take to arrive, default 10.
    ``max_connections``: connections held at once (default 512). ``max_header_bytes``: most head
    bytes (default 64 KiB). ``max_body``: most body bytes buffered for one request (larger
    declared bodies are handed over unread). ``max_pending_bytes``: most body bytes buffered
    over all connections (default ``max(4 * max_body, 256 MiB)``). ``log``: receives one line
    per refused or dropped connection (None: silent).

    Run it with :meth:`serve_forever` (blocks), stop it with :meth:`shutdown` from another
    thread, release it with :meth:`close` (which closes the listener too).
    """

    def __init__(self, listener: socket.socket, handle: Handler, *, max_body: int, request_timeout: float = 10.0,
                 max_connections: int = 512, max_header_bytes: int = 64 << 10, max_pending_bytes: int | None = None,
                 workers: int = 8, log: Callable[[str], None] | None = None) -> None:
        if request_timeout <= 0 or max_connections < 1 or workers < 1 or max_body < 0:
            raise ValueError("request_timeout must be > 0, max_connections and workers >= 1, max_body >= 0")
        self.listener, self.handle = listener, handle
        self.request_timeout = float(request_timeout)
        self.max_connections = int(max_connections)
        self.max_header_bytes = int(max_header_bytes)
        self.max_body = int(max_body)
        self.max_pending_bytes = int(max_pending_bytes if max_pending_bytes is not None
                                     else max(4 * self.max_body, 256 << 20))
        self.log = log
        self.pending_bytes = 0
        self.dropped = 0  # connections answered 408/431/503 or dropped for room
        self._waiting: dict[int, _Conn] = {}  # by file descriptor; only the loop's thread touches it
        self._busy: set[_Conn] = set()  # handed to a worker (guarded by _lock)
        self._returned: list[_Conn] = []  # kept alive by their worker, to wait again (guarded by _lock)
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nnmark-serve")
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()
        self._closed = False

    # -- control ----------------------------------------------------------------------
    def serve_forever(self, poll_interval: float = 0.2) -> None:
        """Accept and buffer until :meth:`shutdown`; ``poll_interval``: longest idle wait (s)."""
        if self._stop.is_set():  # shut down before it started
            return
        self._stopped.clear()
        self.listener.setblocking(False)
        self._sel.register(self.listener, selectors.EVENT_READ, None)
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        next_tick = 0.0
        try:
            while not self._stop.is_set():
                for key, _ in self._sel.select(timeout=min(poll_interval, _TICK_S)):
                    if key.data is None:
                        self._accept()
                    elif key.data == "wake":
                        self._drain_wake()
                    else:
                        self._on_readable(key.data)
                self._take_back()
                now = time.monotonic()
                if now >= next_tick:
                    self._expire(now)
                    next_tick = now + _TICK_S
        finally:
            for obj in (self.listener, self._wake_r):
                try:
                    self._sel.unregister(obj)
                except (KeyError, ValueError):
                    pass
            self._stopped.set()

    def shutdown(self) -> None:
        """Stop :meth:`serve_forever` and wait until it has returned."""
        self._stop.set()
        self._wake()
        self._stopped.wait()

    def close(self) -> None:
        """Close every connection the gate holds and the listener; running handlers finish on their own."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        conns = list(self._waiting.values())
        self._waiting.clear()
        for c in conns:
            self._close(c)
        self._pool.shutdown(wait=False, cancel_futures=True)
        for s in (self._wake_r, self._wake_w, self.listener):
            try:
                s.close()
            except OSError:
                pass
        self._sel.close()

    @property
    def connections(self) -> int:
        """Connections held now (waiting for a request, or being answered)."""
        with self._lock:
            return len(self._waiting) + len(self._busy) + len(self._returned)

    # -- the loop ---------------------------------------------------------------------
    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    def _note(self, conn: _Conn, what: str) -> None:
        self.dropped += 1
        if self.log is not None:
            self.log(f"{conn.addr[0] if conn.addr else '?'}: {what}")

    def _accept(self) -> None:
        for _ in range(_ACCEPT_BURST):
            try:
                sock, addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # e.g. too many open files: leave it in the backlog for now
                return
            sock.setblocking(False)
            now = time.monotonic()
            conn = _Conn(sock, addr, now, self.request_timeout)
            if self.connections >= self.max_connections and not self._make_room():
                self._refuse(conn, 503, "server busy: too many connections; try again")
                continue
            self._waiting[sock.fileno()] = conn
            self._sel.register(sock, selectors.EVENT_READ, conn)

    def _make_room(self) -> bool:
        """Drop the connection that has waited longest for its request; False if all are busy."""
        if not self._waiting:
            return False
        oldest = min(self._waiting.values(), key=lambda c: c.started)
        self._note(oldest, f"dropped after {time.monotonic() - oldest.started:.1f} s without a complete "
                           "request (connection limit reached)")
        self._forget(oldest)
        self._close(oldest)
        return True

    def _on_readable(self, conn: _Conn) -> None:
        try:
            chunk = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:  # the client closed its side
            self._forget(conn)
            if conn.head_end >= 0 and conn.need > len(conn.buf):
                self._dispatch(conn)  # a short body: the handler answers 400
            else:
                self._close(conn)
            return
        conn.buf += chunk
        self._advance(conn)

    def _advance(self, conn: _Conn) -> None:
        """Look at what a waiting connection has buffered; hand it over once its request is complete."""
        if conn.head_end < 0:
            while conn.buf[:2] == b"\r\n":  # empty lines before a request line are ignored
                del conn.buf[:2]
            end = _find_head_end(conn.buf, 0)
            if end < 0:
                if len(conn.buf) > self.max_header_bytes:
                    self._forget(conn)
                    self._refuse(conn, 431, f"request head larger than {self.max_header_bytes} bytes")
                return
            if end > self.max_header_bytes:
                self._forget(conn)
                self._refuse(conn, 431, f"request head larger than {self.max_header_bytes} bytes")
                return
            conn.head_end = end
            body, expect = _framing(bytes(conn.buf[:end]), self.max_body)
            conn.need = end + body
            if body and len(conn.buf) < conn.need:
                if self.pending_bytes + body > self.max_pending_bytes:
                    self._forget(conn)
                    self._refuse(conn, 503, "server busy: too many request bytes in flight; try again")
                    return
                conn.reserved = body
                self.pending_bytes += body
                if expect and not conn.continued:
                    conn.continued = True
                    try:
                        conn.sock.send(b"HTTP/1.1 100 Continue\r\n\r\n")
                    except OSError:
                        pass
        if len(conn.buf) >= conn.need:
            self._forget(conn)
            self._dispatch(conn)

    def _expire(self, now: float) -> None:
        late = [c for c in self._waiting.values() if c.deadline <= now]
        for conn in late:
            self._forget(conn)
            if not conn.buf:
                self._close(conn)  # idle: nothing to answer
            else:
                got = len(conn.buf)
                what = "its head" if conn.head_end < 0 else f"its body ({got - conn.head_end} of " \
                                                             f"{conn.need - conn.head_end} bytes)"
                self._refuse(conn, 408, f"request not complete within {self.request_timeout:g} s "
                                        f"(received {got} bytes, not all of {what})")

    def _forget(self, conn: _Conn) -> None:
        """Stop watching a connection (it is answered, dispatched or closed next)."""
        if self._waiting.get(conn.sock.fileno()) is conn:
            del self._waiting[conn.sock.fileno()]
            try:
                self._sel.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
        self._release(conn)

    def _release(self, conn: _Conn) -> None:
        if conn.reserved:
            self.pending_bytes -= conn.reserved
            conn.reserved = 0

    def _refuse(self, conn: _Conn, status: int, message: str) -> None:
        self._note(conn, f"{status} {message}")
        try:
            conn.sock.send(_answer(status, message))  # small: fits the socket buffer, or is lost
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self._close(conn)

    def _close(self, conn: _Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        try:
            conn.sock.close()
        except OSError:
            pass

    def _dispatch(self, conn: _Conn) -> None:
        n = min(len(conn.buf), conn.need)
        data = bytes(conn.buf[:n])
        del conn.buf[:n]
        with self._lock:
            self._busy.add(conn)  # still counted against max_connections while a worker has it
        try:
            self._pool.submit(self._run, conn, data)
        except RuntimeError:  # the pool is shut down
            with self._lock:
                self._busy.discard(conn)
            self._close(conn)

    def _run(self, conn: _Conn, data: bytes) -> None:
        keep = False
        try:
            conn.sock.setblocking(True)
            keep = bool(self.handle(conn.sock, conn.addr, data))
        except Exception as exc:  # noqa: BLE001 - one broken connection must not stop the server
            if self.log is not None:
                self.log(f"{conn.addr[0] if conn.addr else '?'}: connection failed: {type(exc).__name__}")
        keep = keep and not self._stop.is_set()
        with self._lock:
            self._busy.discard(conn)
            if keep:
                self._returned.append(conn)
        if keep:
            self._wake()
        else:
            try:
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            self._close(conn)

    def _take_back(self) -> None:
        """Connections kept alive after their answer wait for their next request."""
        with self._lock:
            back, self._returned = self._returned, []
        now = time.monotonic()
        for conn in back:
            if conn.closed:
                continue
            conn.reset(now, self.request_timeout)
            try:
                conn.sock.setblocking(False)
                self._sel.register(conn.sock, selectors.EVENT_READ, conn)
            except (OSError, ValueError, KeyError):
                self._close(conn)
                continue
            self._waiting[conn.sock.fileno()] = conn
            if conn.buf:
                self._advance(conn)  # a pipelined request may already be here

