"""Per-item claims of the harness: an exclusive lock per cell that a second process cannot take while the first
holds it, that the kernel drops when the holder is SIGKILLed, and the incremental reader of a results log."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from nnmark.harness.claims import Claims, LogTail, is_locked

HOLD = """
import sys, time
from nnmark.harness.claims import Claims
c = Claims(sys.argv[1])
assert c.try_claim("cell-a")
print("held", flush=True)
time.sleep(600)
"""


def test_a_claim_is_exclusive_across_processes_and_dies_with_its_holder(tmp_path):
    tmp_path = tmp_path / "locks"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        mine = Claims(tmp_path)
        assert is_locked(mine.path("cell-a"))
        assert not mine.try_claim("cell-a")  # held by the other process
        assert mine.try_claim("cell-b") and mine.held() == {"cell-b"}
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        deadline = time.monotonic() + 10
        while not mine.try_claim("cell-a"):  # the kernel releases a killed holder's flock
            assert time.monotonic() < deadline, "the killed holder's claim was never released"
            time.sleep(0.01)
        assert mine.held() == {"cell-a", "cell-b"}
        mine.release_all()
        assert not is_locked(mine.path("cell-a")) and mine.held() == set()
        assert (tmp_path / ".gitignore").read_text().splitlines()[-1] == "*"  # lock files are never committed
    finally:
        holder.kill()
        holder.wait()


def test_claim_ids_cannot_leave_the_lock_folder(tmp_path):
    for bad in ("", "../x", ".hidden", "a/b"):
        with pytest.raises(ValueError):
            Claims(tmp_path).try_claim(bad)


def test_log_tail_reads_only_finished_records_incrementally(tmp_path):
    path = tmp_path / "r.jsonl"
    tail = LogTail(path, "cell", lambda r: r.get("status") != "error")
    assert tail.ids() == set() and "a" not in tail
    with open(path, "a") as fh:
        fh.write(json.dumps({"cell": "a", "status": "ok"}) + "\n" + json.dumps({"cell": "e", "status": "error"}) + "\n")
        fh.write('{"cell": "b", "sta')  # a line still being written
    assert tail.ids() == {"a"}
    with open(path, "a") as fh:
        fh.write('tus": "ok"}\n')
    assert tail.ids() == {"a", "b"}  # the completed line is read on the next look
    path.write_text(json.dumps({"cell": "c"}) + "\n")  # a log that shrank (rewritten) is read from the start
    assert tail.ids() == {"c"}
