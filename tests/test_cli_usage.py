"""Usage errors of the command line: one ``error:`` line and exit 2, never click's multi-line usage text."""

from __future__ import annotations

import sys

import pytest


@pytest.mark.parametrize("args,pattern", [
    (("verify",), "Missing option '--key'"),
    (("bogus",), "No such command 'bogus'"),
    (("train", "--epochs", "x", "--out", "a.safetensors"), "Invalid value for '--epochs'"),
    (("verify", "--key", "k", "--alpha"), "requires an argument"),
])
def test_usage_errors_are_one_line(cli, args, pattern):
    r = cli(*args)
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr.startswith("error: ") and pattern in r.stderr
    assert r.stderr.count("\n") == 1, r.stderr


def test_help_does_not_import_torch():
    import subprocess

    code = "import sys; from nnmark.cli import cli; print('torch' in sys.modules, 'scipy.stats' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
