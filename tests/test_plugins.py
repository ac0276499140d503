"""Third-party components: a plugin package (one scheme, one attack in one file) is built, installed and used.

The package in ``tests/plugin_pkg`` is built and installed with pip into a folder of its own, which the
``nnmark`` processes below see on ``PYTHONPATH`` (the test environment itself is left as it was). Its
entry points must make both components appear in ``nnmark schemes`` and work from the command line like
nnmark's own: embed with the plugin scheme, attack with the plugin attack, verify the result.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli

PLUGIN = Path(__file__).parent / "plugin_pkg"
NNMARK = [sys.executable, "-m", "nnmark.cli"]


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory):
    site = tmp_path_factory.mktemp("plugin-site")
    source = tmp_path_factory.mktemp("plugin-build") / "src"
    shutil.copytree(PLUGIN, source)  # build a copy: the build leaves its artefacts beside the sources
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                           "--disable-pip-version-check", "--target", str(site), str(source)],
                          capture_output=True, text=True, timeout=300, cwd=source)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert any(p.name.startswith("nnmark_toyplugin") and p.suffix == ".dist-info" for p in site.iterdir())
    path = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)


def run(env, *args, timeout=300):
    return subprocess.run([*NNMARK, *args], capture_output=True, text=True, env=env, timeout=timeout)


def test_plugin_components_are_listed_with_their_parameters(plugin_env):
    p = run(plugin_env, "schemes", "--json")
    assert p.returncode == 0, p.stderr
    listing = json.loads(p.stdout)
    by_name = {(c["kind"], c["name"]): c for c in listing["components"]}
    scheme = by_name[("scheme", "sign-mark")]
    attack = by_name[("attack", "weight-noise")]
    assert scheme["origin"] == attack["origin"] == "nnmark-toyplugin"
    assert [q["name"] for q in scheme["params"]] == ["layer", "bits", "margin", "strength"]
    assert {"name": "sigma", "type": "float", "default": 0.1} .items() <= attack["params"][0].items()
    assert ("scheme", "uchida") in by_name and by_name[("scheme", "uchida")]["origin"] == "nnmark"
    assert listing["problems"] == []
    # without the plugin on the path (this process: the plugin is not installed here), neither exists
    clean = run_cli("schemes", "--json")
    assert clean.returncode == 0, clean.stderr
    names = {c["name"] for c in json.loads(clean.stdout)["components"]}
    assert "uchida" in names and "sign-mark" not in names and "weight-noise" not in names


def test_plugin_scheme_and_attack_work_from_the_cli(plugin_env, tmp_path):
    key, marked, noisy = tmp_path / "sign.key", tmp_path / "marked.safetensors", tmp_path / "noisy.safetensors"
    p = run(plugin_env, "embed", "--scheme", "sign-mark", "--data", "digits", "--arch", "mlp", "--epochs", "10",
            "--lr", "3e-3",
            "--param", "bits=48", "--param", "layer=head", "--key-seed", "plugin-test", "--key-out", str(key),
            "--out", str(marked))
    assert p.returncode == 0, p.stderr
    p = run(plugin_env, "attack", str(marked), "--attack", "weight-noise", "--param", "sigma=0.01",
            "--out", str(noisy))
    assert p.returncode == 0, p.stderr
    p = run(plugin_env, "verify", str(noisy), "--key", str(key), "--json")
    assert p.returncode == 0, p.stderr + p.stdout
    verdict = json.loads(p.stdout)
    assert verdict["scheme"] == "sign-mark" and verdict["owned"] and verdict["statistic"] == 48
    # a bad plugin parameter is refused with the declared list, like any other
    p = run(plugin_env, "attack", str(marked), "--attack", "weight-noise", "--param", "sigm=1", "--out",
            str(tmp_path / "x.safetensors"))
    assert p.returncode == 2 and "sigma (float, default 0.1" in p.stderr
