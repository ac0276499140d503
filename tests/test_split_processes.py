"""A minimal 3-owner + server run over real processes (Ray actors on loopback): 2 rounds on the 8x8 digits.

The longer runs (22 rounds, SIGKILL and resume, fingerprint tracing) are in ``test_split_parties.py`` (slow). This
one is part of the default run, so CI runs a real multi-process partitioned training on every change: on an idle
two-core machine it takes 21 s (Ray start, four actors that import torch, 2 rounds, shutdown); 199 s at load 12-14.
Four bare ``torch.distributed`` gloo processes (spawn, init, one all-reduce) took 17.5 s at load 5.5: no cheaper.
"""

from __future__ import annotations

import os

import ray  # the test extra installs it: a missing Ray fails the run instead of skipping it
import torch

from nnmark.keys import Key
from nnmark.split.protocol import SplitConfig, simulate

MINI = {"data": "digits", "arch": "mlp", "arch_overrides": {"hidden": [64, 64, 64], "dropout": 0.1}, "at": "fc2",
        "owners": 3, "epochs": 1, "batch_size": 160, "lr": 1e-2, "defense": "adversarial", "strength": 1.0,
        "defender_kinds": ["64:tanh", "", "64:sigmoid"], "keep_payloads": True}


def test_three_owners_and_a_server_in_their_own_processes(tmp_path):
    """Only activations of the agreed shape and labels reach the server process (no raw batch); owners get only
    the server's gradients and each other's local gradients; the weights are exactly the simulation's."""
    from nnmark.split.parties import run_parties

    torch.set_num_threads(1)
    cfg = SplitConfig.from_dict(MINI)
    sim = simulate(cfg, Key.from_seed("split-processes/session"))
    pids: list[int] = []

    def on_start(owners, server):
        pids.extend(ray.get([p.call.remote(0, "pid") for p in [*owners, server]]))

    res = run_parties(cfg, Key.from_seed("split-processes/session"), tmp_path, on_start=on_start)
    assert res.restarts == 0 and res.rounds == sim.rounds == 2
    assert res.accuracy == sim.accuracy
    sa, sb = res.model.state_dict(), sim.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert {r["party"] for r in res.reports} == {"owner0", "owner1", "owner2", "server"}
    assert len(set(pids)) == 4 and os.getpid() not in pids  # one process per party, none of them this one
    inputs = set().union(*res.input_digests.values())
    assert len(inputs) == 3 * res.rounds
    server = res.messages["server"]
    assert {r["kind"] for r in server} == {"activations", "labels", "local-weights"}
    assert sum(r["kind"] == "activations" for r in server) == 3 * res.rounds
    for r in server:
        assert r["sha256"] not in inputs
        if r["kind"] == "activations":
            assert tuple(r["shape"]) == (160, 64) and r["dtype"] == "float32"
        elif r["kind"] == "labels":
            assert tuple(r["shape"]) == (160,) and r["dtype"] == "int64"
    for i in range(3):
        recs = res.messages[f"owner{i}"]
        assert {r["kind"] for r in recs} == {"gradients", "local-gradients"}
        assert {r["src"] for r in recs if r["kind"] == "gradients"} == {"server"}
        assert not {r["sha256"] for r in recs} & inputs
