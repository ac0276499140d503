"""The generic `nnmark embed` / `nnmark verify` commands on the white-box schemes
(uchida, projection, wang-manu, wang-auto), through the real entry point in this process (the
one-line errors also in a real subprocess): train-to-embed,
fine-tune-to-embed (``--model BASE``), verification of the marked models (exit 0),
of a clean model (exit 1), and one-line errors (exit 2) for bad input.

MLP 784-64-10 on digits-28 keeps each command at a few seconds. Subprocesses run
with one thread (the machine's cores are shared; two threads are much slower here).

Wang's verdict is an exact block-permutation test (every order of each block's
8 units, well under a second); all claims are checked at the default --alpha 1e-6.

Key commitments (``embed`` writes ``KEY.commit.json`` and a log entry; ``verify`` checks
them, refusing keys without a matching, early enough record) are checked at the end, with
``nnmark`` run in this process to spare interpreter start-ups.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CliResult, run_cli

NNMARK = [sys.executable, "-m", "nnmark.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
BITS = 256
# scheme -> layer parameters: Uchida and projection in fc1 (784 -> 64; 50,176 weights), Wang in the
# head (64 -> 10; 640 weights: its permutation test needs a layer that reads hidden units)
LAYERS = {"uchida": "fc1", "projection": "fc1", "wang-manu": "head", "wang-auto": "head"}
CLAIM_ALPHA = {"uchida": "1e-6", "projection": "1e-6", "wang-manu": "1e-6", "wang-auto": "1e-6"}


def run(*args: str) -> CliResult:
    """``nnmark ARGS`` in this process (one thread, like the subprocesses it replaces)."""
    return run_cli(*args)


def run_proc(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``nnmark ARGS`` in a real subprocess (one thread)."""
    return subprocess.run([*NNMARK, *args], capture_output=True, text=True, timeout=timeout, env=ENV)


def assert_one_line_error(proc: subprocess.CompletedProcess | CliResult, pattern: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    err = proc.stderr.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and re.search(pattern, err), err


def embed(d: Path, scheme: str, tag: str, *extra: str) -> CliResult:
    return run("embed", "--scheme", scheme, "--data", "digits28", "--arch", "mlp",
               "--param", f"layer={LAYERS[scheme]}", "--param", f"bits={BITS}", "--key-seed", f"wb-cli-{tag}",
               "--key-out", str(d / f"{tag}.key"), "--out", str(d / f"{tag}.safetensors"), *extra)


def verify(d: Path, model: str, key: str, *extra: str) -> tuple[CliResult, dict]:
    p = run("verify", str(d / f"{model}.safetensors"), "--key", str(d / f"{key}.key"), "--json", *extra)
    assert p.returncode in (0, 1), (p.returncode, p.stderr)
    return p, json.loads(p.stdout)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A folder holding a clean MLP on digits-28 (``base.safetensors``, trained in this
    process like `nnmark train` does, to spare a subprocess) and an untrained CNN."""
    import torch

    from nnmark.data import load_data
    from nnmark.io import save_model
    from nnmark.models import model_spec
    from nnmark.train import TrainConfig, accuracy, seeded_model, train

    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("wbcli")
    splits = load_data("digits28")
    # seed 1: an independent model. `nnmark embed` initialises with --seed 0, and a clean twin
    # (same initialisation and batches, no mark) is outside Wang's null: its secret network
    # reads the message from the twin too (tests/test_whitebox_schemes.py::test_wang_reads_its_clean_twin)
    model = seeded_model(model_spec("mlp", splits.image_shape, splits.num_classes), 1)
    train(model, splits.train, TrainConfig(epochs=5, seed=1, progress=False))
    acc = accuracy(model, splits.test)
    save_model(d / "base.safetensors", model, {"data": "digits28", "test_accuracy": acc})
    (d / "base-accuracy.txt").write_text(str(acc))
    save_model(d / "cnn.safetensors", seeded_model(model_spec("cnn", splits.image_shape, 10), 0), {"data": "digits28"})
    return d


@pytest.mark.parametrize("scheme", list(LAYERS))
def test_train_to_embed_then_verify(base, scheme):
    d = base
    tag = f"{scheme}-scratch"
    p = embed(d, scheme, tag, "--epochs", "10")
    assert p.returncode == 0, p.stderr
    assert (d / f"{tag}.key").stat().st_mode & 0o777 == 0o600
    p, v = verify(d, tag, tag, "--alpha", CLAIM_ALPHA[scheme])
    assert p.returncode == 0 and v["owned"] and v["scheme"] == scheme
    assert v["n"] == BITS and v["statistic"] == BITS
    assert v["details"]["ber"] == 0.0 and v["details"]["matched_bits"] == BITS
    assert v["details"]["layer"] == LAYERS[scheme]
    assert v["p_value"] < float(CLAIM_ALPHA[scheme])


@pytest.mark.parametrize("scheme", ["projection", "wang-auto"])  # one binomial, one permutation verdict
def test_clean_model_not_owned(base, scheme):
    """The clean base model is not claimed with a scratch-embedded key, at the default
    alpha = 1e-6: exit 1 and the verdict in JSON."""
    d = base
    tag = f"{scheme}-scratch"
    if not (d / f"{tag}.key").exists():  # when run alone
        assert embed(d, scheme, tag, "--epochs", "10").returncode == 0
    p, v = verify(d, "base", tag)
    assert p.returncode == 1 and not v["owned"] and v["alpha"] == 1e-6 and v["p_value"] >= 1e-6
    assert 0 <= v["details"]["matched_bits"] <= BITS and "null_hypothesis" in v


@pytest.mark.parametrize("scheme", list(LAYERS))
def test_fine_tune_to_embed_then_verify(base, scheme):
    d = base
    tag = f"{scheme}-ft"
    p_embed = embed(d, scheme, tag, "--model", str(d / "base.safetensors"))  # default: 3 epochs of fine-tuning
    assert p_embed.returncode == 0, p_embed.stderr
    p, v = verify(d, tag, tag, "--alpha", CLAIM_ALPHA[scheme])
    assert p.returncode == 0 and v["owned"], v
    assert v["details"]["ber"] <= 0.01 and v["details"]["matched_bits"] >= 0.99 * BITS
    # fidelity of the fine-tuned model, from the commands' own reports
    assert _accuracy(p_embed) > _accuracy_of_base(d) - 0.03


def _accuracy(proc: subprocess.CompletedProcess) -> float:
    return float(re.search(r"test accuracy ([\d.]+)", proc.stdout).group(1))


def _accuracy_of_base(d: Path) -> float:
    return float((d / "base-accuracy.txt").read_text())


def test_bad_layer_and_too_many_bits(base):
    d = base
    p = run_proc("embed", "--scheme", "uchida", "--data", "digits28", "--arch", "mlp", "--param", "layer=conv4",
            "--param", "bits=64", "--key-out", str(d / "bad1.key"), "--out", str(d / "bad1.safetensors"))
    assert_one_line_error(p, r"no conv/linear layer named 'conv4' \(available: fc1, head\)")
    # the same entry point in this process (the first case above is the one in a separate interpreter)
    p = run("embed", "--scheme", "wang-auto", "--data", "digits28", "--arch", "mlp", "--param", "layer=head",
            "--param", "bits=1000", "--key-out", str(d / "bad2.key"), "--out", str(d / "bad2.safetensors"))
    assert_one_line_error(p, r"too small for 1000 bits.*only 640 values")
    assert not (d / "bad1.key").exists() and not (d / "bad2.key").exists()


def test_key_for_another_architecture(base):
    """An MLP key checked against a CNN model file: exit 2, one line."""
    d = base
    if not (d / "uchida-scratch.key").exists():  # when run alone
        assert embed(d, "uchida", "uchida-scratch", "--epochs", "2").returncode == 0
    p = run("verify", str(d / "cnn.safetensors"), "--key", str(d / "uchida-scratch.key"))
    assert_one_line_error(p, r"another architecture")


# --------------------------------------------------------------------------- key commitments
def run_here(capsys, *args: str) -> tuple[int, str, str]:
    """`nnmark ARGS` in this process (no interpreter start-up): (exit code, stdout, stderr)."""
    from nnmark.cli import main

    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out = capsys.readouterr()
    return int(exc.value.code or 0), out.out, out.err


def _committed(base: Path, scheme: str = "uchida") -> tuple[Path, Path]:
    tag = f"{scheme}-scratch"
    if not (base / f"{tag}.key").exists():  # when run alone
        assert embed(base, scheme, tag, "--epochs", "10").returncode == 0
    return base / f"{tag}.key", base / f"{tag}.safetensors"


def test_embed_commits_the_key(base):
    from nnmark.commitment import CommitmentLog, read_record
    from nnmark.io import file_sha256

    key, model = _committed(base)
    record_file = Path(str(key) + ".commit.json")
    rec = read_record(record_file)
    doc = json.loads(key.read_text())
    assert rec.model_sha256 == file_sha256(model) and rec.key_id == doc["key_id"] and rec.scheme == "uchida"
    assert doc["secret"] not in record_file.read_text() and "secret" not in json.loads(record_file.read_text())
    log = CommitmentLog(base / "commitments.db")
    assert log.verify().ok and log.find(rec.record_sha256) is not None


def test_verify_reports_and_checks_the_commitment(base, capsys, tmp_path):
    key, model = _committed(base)
    code, out, _ = run_here(capsys, "verify", str(model), "--key", str(key), "--json")
    v = json.loads(out)
    c = v["details"]["commitment"]
    assert code == 0 and v["owned"] and v["details"]["status"] == "committed" and v["details"]["evidence"]
    assert c["matches_key"] and c["suspect_is_committed_model"] and c["log"]["chain_intact"]
    assert "was committed at " + c["committed_at"] in v["null_hypothesis"]
    # a suspect first seen before the key was committed: refused
    code, out, _ = run_here(capsys, "verify", str(model), "--key", str(key), "--json",
                            "--suspect-seen-at", "2020-01-01")
    v = json.loads(out)
    assert code == 1 and not v["owned"] and v["details"]["status"] == "committed-after-suspect" and v["p_value"] == 1
    # the key without its record (a thief's key, a lost record): refused, loudly
    bare = tmp_path / "bare.key"
    bare.write_bytes(key.read_bytes())
    code, out, err = run_here(capsys, "verify", str(model), "--key", str(bare))
    assert code == 1 and "NOT EVIDENCE -- refused (uncommitted-key)" in out and "OWNED" not in out
    code, out, err = run_here(capsys, "verify", str(model), "--key", str(bare), "--json", "--allow-uncommitted")
    v = json.loads(out)
    assert code == 1 and not v["owned"] and v["details"]["unverified_p_value"] < 1e-6 and err.startswith("WARNING:")
    # the record given explicitly; a key file altered after it was committed
    doc = json.loads(key.read_text())
    doc["params"]["strength"] = 0.5
    bare.write_text(json.dumps(doc))
    code, out, _ = run_here(capsys, "verify", str(model), "--key", str(bare), "--json",
                            "--commitment", str(key) + ".commit.json")
    assert code == 1 and json.loads(out)["details"]["status"] == "commitment-mismatch"
    # bad input: one-line errors, exit 2
    code, _, err = run_here(capsys, "verify", str(model), "--key", str(key), "--commitment", str(tmp_path / "none"))
    assert code == 2 and "commitment record not found" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_here(capsys, "verify", str(model), "--key", str(key), "--suspect-seen-at", "last tuesday")
    assert code == 2 and "ISO 8601" in err
