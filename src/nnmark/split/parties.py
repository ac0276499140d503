"""The partitioned protocol with every party in its own process: Ray actors, one per owner and one server.

:func:`run_parties` starts one Ray actor per data owner and one for the server, on a Ray instance started
here on this machine (default) or on an existing cluster (``address``, or ``RAY_ADDRESS``), and drives the
same rounds as :func:`nnmark.split.protocol.simulate` (:func:`~nnmark.split.protocol.run_rounds`). What
stays where:

- each owner actor loads its own shard of the images itself, inside its process; only its activations and
  labels go to the server, only the server's gradients for its activations come back, and the owners' local
  gradients go from owner to owner (the driver passes Ray object references; the server never receives them);
- each party reads its own key file (``<run>/keys/<party>.json``, mode 0600, written by
  :func:`write_party_keys`), never another party's, and never receives a key over Ray;
- every party logs what it receives (:class:`~nnmark.split.protocol.MessageLog`); :attr:`PartiesResult.messages`
  collects the logs at the end, for inspection.

Failures: with ``checkpoint_every`` set, every party saves its state every that many rounds and the driver
then writes the manifest (:mod:`nnmark.split.checkpoint`). When a party's process dies (an owner dropping
out, the server restarting) the driver stops every actor, starts them afresh from the last manifest and goes
on; after ``max_restarts`` restarts it gives up (:class:`~nnmark.split.partition.SplitError`). Resuming is
exact: batch order, dropout masks, noise and optimiser moments are all in the checkpoint, so a resumed run
ends with the same weights as one that was never interrupted.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from nnmark.keys import Key
from nnmark.split import checkpoint as ckpt
from nnmark.split.partition import SplitError
from nnmark.split.protocol import (
    FingerprintPlan,
    OwnerParty,
    ServerParty,
    SplitConfig,
    evaluate,
    party_keys,
    run_rounds,
    total_rounds,
)

KEY_SCHEME = "split-party"


def write_party_keys(directory: str | Path, session_key: Key, n_owners: int,
                     fingerprint_key: Key | None = None) -> dict[str, Path]:
    """Write each party's own key file under ``<directory>/keys/`` (0600): ``owner<i>.json``
    (``split/owner/<i>``), ``server.json`` (``split/server``) and, when given, ``product.json`` (the
    fingerprint's product key, for the server only). Returns ``{party: path}``."""
    from nnmark.keyfile import KeyFile, save_key_file

    d = Path(directory) / "keys"
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    okeys, skey = party_keys(session_key, n_owners)
    paths = {}
    for name, key in [*((f"owner{i}", k) for i, k in enumerate(okeys)), ("server", skey),
                      *((("product", fingerprint_key),) if fingerprint_key is not None else ())]:
        paths[name] = d / f"{name}.json"
        save_key_file(paths[name], KeyFile(key=key, scheme=KEY_SCHEME, params={"party": name}))
    return paths


def _load_key(path: str) -> Key:
    from nnmark.keyfile import load_key_file

    return load_key_file(path, expect_scheme=KEY_SCHEME).key


class _PartyActor:
    """The process of one party: builds its :class:`OwnerParty` or :class:`ServerParty` from its own key file."""

    def __init__(self, role: str, cfg: dict[str, Any], index: int, key_file: str,
                 fingerprint: dict[str, Any] | None = None, threads: int = 1) -> None:
        import torch

        torch.set_num_threads(threads)
        config = SplitConfig.from_dict(cfg)
        if role == "owner":
            self.party: Any = OwnerParty(config, index, _load_key(key_file))
        else:
            plan = None
            if fingerprint is not None:
                plan = FingerprintPlan(_load_key(fingerprint["key_file"]),
                                       np.asarray(fingerprint["fingerprint"], dtype=np.float64),
                                       tuple(fingerprint["layers"]), float(fingerprint["scale"]),
                                       float(fingerprint["strength"]))
            self.party = ServerParty(config, _load_key(key_file), plan)

    def call(self, n: int, method: str, *args: Any) -> Any:
        out = getattr(self.party, method)(*args)
        if n > 1:
            return tuple(out)
        return out[0] if n == 1 and isinstance(out, list) else out


class RayTransport:
    """Transport for :func:`~nnmark.split.protocol.run_rounds` over Ray actors (calls return object refs)."""

    def __init__(self, ray: Any) -> None:
        self.ray = ray

    def call(self, actor: Any, method: str, *args: Any, returns: int = 0) -> Any:
        if returns:
            refs = actor.call.options(num_returns=returns).remote(returns, method, *args)
            return list(refs) if returns > 1 else [refs]
        return actor.call.remote(0, method, *args)

    def get(self, x: Any) -> Any:
        return self.ray.get(x)


@dataclass
class PartiesResult:
    """A finished multi-process run: the assembled ``model``, its ``accuracy``, ``rounds``, wall ``seconds``
    (actor start-up included; ``train_seconds`` without it), ``restarts``, per-party ``reports``, every party's
    received ``messages`` and each owner's record of its raw batches' SHA-256 (``input_digests``)."""

    model: nn.Module
    accuracy: float
    rounds: int
    seconds: float
    train_seconds: float
    restarts: int
    reports: list[dict[str, Any]]
    messages: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    input_digests: dict[str, set[str]] = field(default_factory=dict)


def _init_ray(address: str | None, cpus: int) -> tuple[Any, bool]:
    try:
        import ray
    except ImportError:
        raise SplitError("separate party processes need the 'ray' package: pip install 'nnmark[ray]'") from None
    if ray.is_initialized():
        return ray, False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    else:
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    return ray, True


def run_parties(cfg: SplitConfig, session_key: Key, run_dir: str | Path, *,
                fingerprint: FingerprintPlan | None = None, address: str | None = None, max_restarts: int = 3,
                progress: Callable[[int, int, list[dict[str, Any]]], None] | None = None, every: int = 0,
                on_start: Callable[[list[Any], Any], None] | None = None, keep_ray: bool = False) -> PartiesResult:
    """Run the protocol with one process per party (module doc). ``run_dir`` holds the party key files and the
    checkpoints (``<run_dir>/checkpoints``); a run directory with a manifest resumes from it.
    ``on_start(owner_actors, server_actor)`` is called each time the actors are (re)started.
    ``keep_ray``: leave a Ray instance started here running (for several runs in one process)."""
    t0 = time.perf_counter()
    run = Path(run_dir)
    keys = write_party_keys(run, session_key, cfg.owners, fingerprint.key if fingerprint is not None else None)
    ck = str(run / "checkpoints")
    fp = None
    if fingerprint is not None:
        fp = {"key_file": str(keys["product"]), "fingerprint": np.asarray(fingerprint.fingerprint).tolist(),
              "layers": list(fingerprint.layers), "scale": fingerprint.scale, "strength": fingerprint.strength}
    ray, started = _init_ray(address, cfg.owners + 1)
    actor_cls = ray.remote(num_cpus=1, max_restarts=0)(_PartyActor)
    transport = RayTransport(ray)
    stop = total_rounds(cfg)
    restarts = 0
    try:
        while True:
            owners = [actor_cls.remote("owner", cfg.to_dict(), i, str(keys[f"owner{i}"])) for i in range(cfg.owners)]
            server = actor_cls.remote("server", cfg.to_dict(), 0, str(keys["server"]), fp)
            parties = [*owners, server]
            try:
                man = ckpt.read_manifest(ck)
                start = int(man["round"]) if man else 0
                if start:
                    ray.get([transport.call(p, "load", ck, start) for p in parties])
                else:
                    ray.get([transport.call(p, "report") for p in parties])  # wait until every party is up
                if on_start is not None:
                    on_start(owners, server)
                t_train = time.perf_counter()
                run_rounds(cfg, transport, owners, server, start, stop, ck, progress, every)
                train_seconds = time.perf_counter() - t_train
                model = ray.get(transport.call(server, "assemble", transport.call(owners[0], "local_state")))
                messages = dict(zip([f"owner{i}" for i in range(cfg.owners)] + ["server"],
                                    ray.get([transport.call(p, "messages") for p in parties]), strict=True))
                digests = dict(zip([f"owner{i}" for i in range(cfg.owners)],
                                   ray.get([transport.call(o, "digests") for o in owners]), strict=True))
                reports = ray.get([transport.call(p, "report") for p in parties])
                break
            except ray.exceptions.RayActorError as exc:
                restarts += 1
                if restarts > max_restarts:
                    raise SplitError(f"a party died {restarts} times; giving up ({exc.__class__.__name__})") from None
            finally:
                for p in parties:
                    ray.kill(p)
    finally:
        if started and not keep_ray:
            ray.shutdown()
    return PartiesResult(model, evaluate(model, cfg), stop, time.perf_counter() - t0, train_seconds, restarts,
                         reports, messages, digests)
