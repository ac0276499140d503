"""The black-box journey through the real command line (slow): ``nnmark fingerprint issue --code tardos:M
--workers 2``, ``nnmark attack --attack average``, ``nnmark serve`` of the average and of a single copy, and
``nnmark fingerprint trace --url`` against each served API -- every step a real process."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from nnmark.io import save_model

NNMARK = [sys.executable, "-c", "from nnmark.cli import main; main()"]
ENV = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
M = 128

pytestmark = pytest.mark.slow


def nnmark(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([*NNMARK, *args], capture_output=True, text=True, timeout=timeout, env=ENV)


@contextmanager
def served(model: Path, *extra: str, startup_s: float = 120):
    """``nnmark serve MODEL --port 0 [EXTRA...]`` in its own process; yields the URL from its ready line."""
    proc = subprocess.Popen([*NNMARK, "serve", str(model), "--port", "0", *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        deadline, url = time.monotonic() + startup_s, None
        assert proc.stdout is not None
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            m = re.search(r"https?://[\w.\-\[\]:]+", line)
            url = m.group(0) if m else None
        assert url is not None, proc.stderr.read() if proc.stderr else "no output"
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def trace_url(shop: Path, url: str) -> tuple[int, dict]:
    r = nnmark("fingerprint", "trace", "--product", str(shop), "--url", url, "--budget", str(M), "--stop", "budget",
               "--json")
    assert r.returncode in (0, 1), r.stderr
    return r.returncode, json.loads(r.stdout)


def test_issue_with_two_workers_serve_an_average_and_trace_it_by_url(tmp_path: Path, clean_models) -> None:
    base = save_model(tmp_path / "base.safetensors", clean_models[("cnn", 0)], {"data": "digits"})
    shop = tmp_path / "shop"
    r = nnmark("fingerprint", "issue", "--product", str(shop), "--base", str(base), "--customers", "3",
               "--code", f"tardos:{M}", "--capacity", "2000", "--colluders", "2", "--noise", "0.3", "--steps", "150",
               "--lr", "2e-3", "--workers", "2", "--key-seed", "bb-journey", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    issued = {o["customer"]: o for o in out["issued"]}
    assert sorted(issued) == ["customer-0001", "customer-0002", "customer-0003"] and out["failed"] == []
    assert len({o["code"] for o in issued.values()}) == 3  # two processes, never one code twice
    # re-running issues nobody again
    again = json.loads(nnmark("fingerprint", "issue", "--product", str(shop), "--customers", "3", "--json").stdout)
    assert again["issued"] == [] and again["already_issued"] == 3

    avg = tmp_path / "avg.safetensors"
    r = nnmark("attack", issued["customer-0001"]["file"], issued["customer-0002"]["file"], "--attack", "average",
               "--out", str(avg))
    assert r.returncode == 0, r.stderr

    with served(Path(issued["customer-0003"]["file"])) as url:  # one leaked copy behind an API showing labels
        code, rep = trace_url(shop, url)
    assert code == 0 and [v["customer"] for v in rep["named"]] == ["customer-0003"]
    assert rep["answers_read"] == "labels"
    assert rep["named"][0]["p_value"] <= rep["alpha"] / rep["n_codes"] and rep["queries_used"] <= M

    for extra, read in (((), "labels"), (("--probabilities",), "probabilities")):
        with served(avg, *extra) as url:  # the average of customers 1 and 2 behind its API
            code, rep = trace_url(shop, url)
        named = [v["customer"] for v in rep["named"]]
        assert rep["answers_read"] == read
        assert set(named) <= {"customer-0001", "customer-0002"}, read  # never the innocent customer-0003
        assert (code == 0) == bool(named) and rep["queries_used"] == M
        best = min([v["p_value"] for v in [*rep["named"], *rep["suspects"]]
                    if v["customer"] in ("customer-0001", "customer-0002")] + [1.0])
        print(f"{read}: named {named}, best colluder p {best:.2g}, level alpha/N {rep['alpha'] / rep['n_codes']:.2g}")
