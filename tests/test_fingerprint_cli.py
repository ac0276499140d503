"""``nnmark fingerprint issue`` / ``trace`` through the real entry point (in this process; one-line errors also in a
real subprocess), and issuing fan-out (process pool, Ray)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import CliResult, run_cli

from nnmark.attacks import Average
from nnmark.fingerprint import IssueConfig, Product, issue_many
from nnmark.io import load_model, save_model
from nnmark.keys import Key
from nnmark.models import model_spec
from nnmark.train import TrainConfig, seeded_model, train

NNMARK = [sys.executable, "-c", "from nnmark.cli import main; main()"]


def run(*args: str) -> CliResult:
    """``nnmark ARGS`` in this process (exit code, stdout, stderr)."""
    return run_cli(*args)


def run_proc(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """``nnmark ARGS`` in a real subprocess."""
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run([*NNMARK, *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def small_base(tmp_path_factory, digits):
    """A briefly trained CNN on digits (accuracy is not what these tests check)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = seeded_model(model_spec("cnn", digits.image_shape, 10), 3)
        train(model, digits.train, TrainConfig(epochs=2, seed=3, progress=False))
    finally:
        torch.set_num_threads(before)
    path = tmp_path_factory.mktemp("fp_cli") / "base.safetensors"
    save_model(path, model, {"data": "digits"})
    return path


def test_cli_issue_and_trace(small_base, tmp_path):
    shop = tmp_path / "shop"
    proc = run("fingerprint", "issue", "--product", str(shop), "--base", str(small_base), "--customers", "5",
               "--train", "none", "--key-seed", "cli-test", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert len(out["issued"]) == 5 and not out["failed"]
    assert len({c["code"] for c in out["issued"]}) == 5
    key_text = json.loads((shop / "key.json").read_text())["secret"]
    assert (shop / "key.json").stat().st_mode & 0o777 == 0o600
    assert key_text not in proc.stdout + proc.stderr
    # re-running resumes: nothing left to issue
    again = run("fingerprint", "issue", "--product", str(shop), "--customers", "5", "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["already_issued"] == 5
    copies = {c["customer"]: load_model(c["file"])[0] for c in out["issued"]}
    avg = Average().attack([copies["customer-0002"], copies["customer-0004"]])
    save_model(tmp_path / "avg.safetensors", avg)
    proc = run("fingerprint", "trace", str(tmp_path / "avg.safetensors"), "--product", str(shop), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert sorted(a["customer"] for a in report["accused"]) == ["customer-0002", "customer-0004"]
    assert all(a["p_value"] < 1e-3 for a in report["accused"]) and report["null_hypothesis"]
    # human-readable form, and a clean model names nobody (exit 1)
    proc = run("fingerprint", "trace", str(small_base), "--product", str(shop / "registry.db"))
    assert proc.returncode == 1 and "nobody is named" in proc.stdout
    assert key_text not in proc.stdout + proc.stderr


def test_cli_errors_are_one_line(small_base, tmp_path, digits, capsys):
    lenet = seeded_model(model_spec("lenet5", digits.image_shape, 10), 0)
    save_model(tmp_path / "lenet.safetensors", lenet)
    shop = tmp_path / "shop"
    Product.create(shop, small_base, key=Key.from_seed("cli-err"), issue=IssueConfig(train="none"))
    cases = [
        (["fingerprint", "trace", str(tmp_path / "lenet.safetensors"), "--product", str(shop)], "does not match"),
        (["fingerprint", "trace", str(small_base), "--product", str(tmp_path / "missing")], "no product"),
        (["fingerprint", "issue", "--product", str(tmp_path / "big"), "--base", str(small_base), "--customers",
          "2", "--code", "ag:29"], "576"),
    ]
    for i, (args, pattern) in enumerate(cases):
        proc = run_proc(*args) if i == 0 else run(*args)  # one in a separate interpreter, the rest in-process
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and pattern in lines[0], proc.stderr
    # the same entry point in-process (cheaper than a subprocess each)
    from nnmark.cli import main

    for args, pattern in [
        (["fingerprint", "issue", "--product", str(tmp_path / "new"), "--customers", "3"], "--base"),
        (["fingerprint", "issue", "--product", str(shop), "--customers", "60", "--train", "none"], "codes left"),
    ]:
        with pytest.raises(SystemExit) as exc:
            main(args)
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(err) == 1 and pattern in err[0], err


def test_process_pool_issues_unique_codes(small_base, tmp_path):
    prod = Product.create(tmp_path / "pool", small_base, key=Key.from_seed("pool"), issue=IssueConfig(train="none"))
    names = [f"p{i}" for i in range(6)]
    prod.add_customers(names)
    outcomes = issue_many(prod.root, names, engine="local", workers=2)
    assert all(o.ok for o in outcomes), [o.error for o in outcomes]
    assert len({o.copy.code_index for o in outcomes}) == 6
    assert prod.registry.audit(check_files=True) == []


def test_ray_engine_local_cluster(small_base, tmp_path):
    ray = pytest.importorskip("ray")
    prod = Product.create(tmp_path / "ray", small_base, key=Key.from_seed("ray"), issue=IssueConfig(train="none"))
    names = [f"r{i}" for i in range(6)]
    prod.add_customers(names)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        outcomes = issue_many(prod.root, names, engine="ray", workers=2)
    finally:
        ray.shutdown()
    assert all(o.ok for o in outcomes), [o.error for o in outcomes]
    codes = [o.copy.code_index for o in outcomes]
    assert len(set(codes)) == 6 and prod.registry.audit(check_files=True) == []
    models = {o.customer: load_model(o.copy.model_path)[0] for o in outcomes}
    assert sorted(prod.trace(Average().attack([models["r1"], models["r5"]])).named) == ["r1", "r5"]
