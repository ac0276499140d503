"""Partitioned training over real processes (one Ray actor per owner and one for the server, on loopback).

Slow: starting the actors (each a Python process importing torch) takes tens of seconds on two busy cores.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from nnmark.keys import Key
from nnmark.split import checkpoint as ckpt
from nnmark.split.parties import run_parties
from nnmark.split.protocol import SplitConfig, simulate

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")

BASE = {"data": "digits", "arch": "mlp", "arch_overrides": {"hidden": [64, 64, 64], "dropout": 0.1}, "at": "fc2",
        "owners": 3, "epochs": 2, "batch_size": 32, "lr": 1e-2, "defense": "adversarial", "strength": 1.0,
        "defender_kinds": ["64:tanh", "", "64:sigmoid"], "checkpoint_every": 3}


@pytest.fixture(scope="module")
def ray_session():
    torch.set_num_threads(1)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def reference():
    """The same protocol with every party in this process."""
    cfg = SplitConfig.from_dict(BASE)
    return cfg, simulate(cfg, Key.from_seed("split-parties/session"))


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_three_owners_over_processes_match_the_simulation_and_send_no_images(ray_session, reference, tmp_path):
    """(1) a 3-owner run over separate processes completes with the simulation's accuracy (the very same weights);
    (2) every message that crossed a process boundary is an activation of the agreed shape, labels, or gradients;
    none is an input batch."""
    cfg, sim = reference
    res = run_parties(SplitConfig.from_dict({**BASE, "keep_payloads": True}), Key.from_seed("split-parties/session"),
                      tmp_path, keep_ray=True)
    assert res.restarts == 0 and res.rounds == sim.rounds == 22
    assert res.accuracy == sim.accuracy and _same_weights(res.model, sim.model)
    pids = {r["party"] for r in res.reports}
    assert pids == {"owner0", "owner1", "owner2", "server"}
    inputs = set().union(*res.input_digests.values())
    assert len(inputs) == 3 * res.rounds  # every raw batch the owners used is on record (and none was sent)
    server = res.messages["server"]
    assert {r["kind"] for r in server} == {"activations", "labels", "local-weights"}
    assert sum(r["kind"] == "activations" for r in server) == 3 * res.rounds
    for r in server:
        assert r["sha256"] not in inputs and tuple(r["shape"][1:]) != (1, 8, 8)
        if r["kind"] == "activations":
            assert tuple(r["shape"]) == (32, 64) and r["dtype"] == "float32"
        if r["kind"] == "labels":
            assert tuple(r["shape"]) == (32,) and r["dtype"] == "int64"
    for i in range(3):
        recs = res.messages[f"owner{i}"]
        assert {r["kind"] for r in recs} == {"gradients", "local-gradients"}
        assert {r["src"] for r in recs if r["kind"] == "gradients"} == {"server"}
        assert {r["src"] for r in recs if r["kind"] == "local-gradients"} == {f"owner{j}" for j in range(3) if j != i}
        assert not {r["sha256"] for r in recs} & inputs
    # key files: one per party, private
    for name in ("owner0", "owner1", "owner2", "server"):
        assert (tmp_path / "keys" / f"{name}.json").stat().st_mode & 0o077 == 0


def test_sigkill_of_an_owner_resumes_from_the_checkpoint(ray_session, reference, tmp_path):
    """(3) SIGKILL owner1's process mid-training: the driver restarts the parties from the last manifest, training
    completes, and the model is exactly the uninterrupted one."""
    cfg, sim = reference
    killed: dict[str, int] = {}

    def on_start(owners, server):
        if killed:
            return
        pid = ray.get(owners[1].call.remote(0, "pid"))

        def kill_later():
            deadline = time.time() + 300
            while time.time() < deadline:
                man = ckpt.read_manifest(tmp_path / "checkpoints")
                if man and man["round"] >= 9:
                    killed["round"] = man["round"]
                    os.kill(pid, signal.SIGKILL)
                    return
                time.sleep(0.05)

        killed["pid"] = pid
        threading.Thread(target=kill_later, daemon=True).start()

    res = run_parties(cfg, Key.from_seed("split-parties/session"), tmp_path, on_start=on_start, keep_ray=True)
    assert killed.get("round", 0) >= 9 and res.restarts == 1
    assert res.rounds == sim.rounds and _same_weights(res.model, sim.model)
    assert res.accuracy == sim.accuracy and res.accuracy > 0.5
