"""White-box hooks under DistributedDataParallel: 2 processes, gloo backend.

Each rank trains on its half of every global batch of 32 (DDP averages the
gradients, so this is the single-process run up to the uneven last batch); the
marks extracted after DDP training must equal those of the single-process run
(BER 0, same bits) and the ranks must hold identical weights and secret networks.
"""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from nnmark.data import load_splits
from nnmark.keys import Key
from nnmark.models import model_spec
from nnmark.schemes.uchida import Uchida
from nnmark.schemes.wang import WangAuto
from nnmark.train import seeded_model

EPOCHS, BATCH, BITS = 4, 32, 256
SCHEMES = {"uchida": Uchida, "wang-auto": WangAuto}


def _run(name: str, rank: int, world: int, out_dir: str) -> None:
    """Train an MLP on digits-28 with ``name``'s hook in a plain loop; rank ``rank`` of ``world``."""
    torch.set_num_threads(1)
    data = load_splits("digits28").train
    spec = model_spec("mlp", data.image_shape, 10)
    model = seeded_model(spec, 0)
    scheme = SCHEMES[name].create(Key.from_seed("ddp"), model, layer="head", bits=BITS)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    hook = scheme.training_hook()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    step = 0
    for epoch in range(EPOCHS):
        for x, y in data.batches(BATCH, shuffle=True, generator=gen):
            half = (len(x) + world - 1) // world
            x, y = x[rank * half : (rank + 1) * half], y[rank * half : (rank + 1) * half]
            loss = F.cross_entropy(net(x), y)
            reg = hook.loss(net)
            if reg is not None:
                loss = loss + reg
            opt.zero_grad()
            loss.backward()
            opt.step()
            hook.after_step(net, step)
            step += 1
        hook.on_epoch_end(net, epoch)
    if hasattr(hook, "finalize"):
        hook.finalize(net)  # Wang: the secret network alone, on the final weights (same on every rank)
    bits = scheme.extract(net)
    np.savez(os.path.join(out_dir, f"{name}-{world}-{rank}.npz"), bits=bits,
             ber=float(np.mean(bits != scheme.message)), head=model.head.weight.detach().numpy())


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for name in SCHEMES:
            _run(name, rank, world, out_dir)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    for name in SCHEMES:
        _run(name, 0, 1, str(out))
    return out


@pytest.mark.parametrize("name", list(SCHEMES))
def test_ddp_mark_matches_single_process(results, name):
    r0 = np.load(results / f"{name}-2-0.npz")
    r1 = np.load(results / f"{name}-2-1.npz")
    single = np.load(results / f"{name}-1-0.npz")
    assert float(single["ber"]) == 0.0
    assert float(r0["ber"]) == 0.0 and float(r1["ber"]) == 0.0
    np.testing.assert_array_equal(r0["bits"], r1["bits"])  # ranks agree (secret net included)
    np.testing.assert_array_equal(r0["bits"], single["bits"])
    np.testing.assert_array_equal(r0["head"], r1["head"])
