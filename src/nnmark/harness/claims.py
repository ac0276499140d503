"""Per-item claims: two ``nnmark evaluate`` runs on one output folder never both run a cell.

A run claims an item (a grid cell, a false-alarm check, a forgery, a trace) by taking an exclusive, non-blocking
``flock`` on ``<out>/locks/<ident>.lock`` and holds it from before the item is started until its record is
appended (fsynced) to the item's log; only then is it released. The kernel drops an ``flock`` when the process
holding it exits, however it dies (SIGKILL included), so a killed run never blocks a rerun: its half-done item is
simply unclaimed and unrecorded, and the next run does it.

After taking a lock a run reads the log once more (:class:`LogTail`): another run may have finished the item
between this run's first look and its claim, and then its record is kept and the item is not run again. A run
that finds an item locked does not wait on it there; it takes up the rest of its work and comes back to the
locked items at the end, polling their locks without blocking (so that two runs each waiting on the other's item
cannot deadlock), and reads the holder's record once the lock is free -- or runs the item itself when the holder
died without recording it.

The lock files stay behind (empty; the folder git-ignores itself); a lock file that exists but is not locked
means nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


class LogTail:
    """The ids recorded so far in a JSON-lines log, read incrementally (only what was appended since the last look;
    a torn last line is left for the next look; a log that shrank is read again from the start).

    ``key``: the field that names the item; ``accept``: which records count as finished (by default all)."""

    def __init__(self, path: str | Path, key: str, accept: Callable[[dict[str, Any]], bool] | None = None) -> None:
        self.path = Path(path)
        self.key = key
        self.accept = accept or (lambda rec: True)
        self._offset = 0
        self._ids: set[str] = set()

    def ids(self) -> set[str]:
        """Every finished item's id in the log now."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            self._offset, self._ids = 0, set()
            return set()
        if size < self._offset:
            self._offset, self._ids = 0, set()
        if size > self._offset:
            with open(self.path, "rb") as fh:
                fh.seek(self._offset)
                chunk = fh.read(size - self._offset)
            end = chunk.rfind(b"\n") + 1
            for line in chunk[:end].splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict) and self.key in rec and self.accept(rec):
                    self._ids.add(str(rec[self.key]))
            self._offset += end
        return set(self._ids)

    def __contains__(self, ident: object) -> bool:
        return ident in self.ids()


class Claims:
    """Exclusive per-item locks under ``root`` (``<root>/<ident>.lock``), held by this process (see the module
    docs). ``try_claim`` never blocks; ``release`` drops one claim, ``release_all`` every claim still held."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._held: dict[str, int] = {}

    def path(self, ident: str) -> Path:
        if not ident or "/" in ident or ident.startswith("."):
            raise ValueError(f"not a claimable id: {ident!r}")
        return self.root / f"{ident}.lock"

    def try_claim(self, ident: str) -> bool:
        """Take the item's lock if nobody holds it; ``True`` when this process holds it now."""
        if ident in self._held:
            return True
        path = self.path(ident)
        if not self.root.is_dir():
            self.root.mkdir(parents=True, exist_ok=True)
            (self.root / ".gitignore").write_text("# nnmark evaluate: per-item lock files; never commit\n*\n")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        self._held[ident] = fd
        return True

    def release(self, ident: str) -> None:
        fd = self._held.pop(ident, None)
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def release_all(self) -> None:
        for ident in list(self._held):
            self.release(ident)

    def held(self) -> set[str]:
        return set(self._held)


def is_locked(path: str | Path) -> bool:
    """Whether some process holds the ``flock`` of ``path`` now (a probe: takes and drops it when free)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


@contextlib.contextmanager
def exclusive(path: str | Path) -> Iterator[None]:
    """Hold the blocking exclusive ``flock`` of ``path`` for the ``with`` block (for short critical sections:
    appending a record, writing the reports)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
