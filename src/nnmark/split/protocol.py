"""The partitioned training protocol: data owners with defenders, a server with the fingerprint regulariser.

One *round*: every owner takes one batch of its own images ``x`` and

1. (adversarial and artificial readings) trains each of its defenders ``D`` for ``defender_steps`` steps to
   reconstruct ``x`` from the activations ``h = f_l(x)`` (``min MSE(x, D(h))``: the defender simulates the
   attacker at the server);
2. sends the activations of the batch and its labels to the server (``"activations"``, ``"labels"``);
   under the *artificial* reading (Algorithm 1, step 3 read literally) the activations are ``f_l(D(f_l(x)))``,
   the local part applied to the defender's artificial images, and the defender is trained with the literal
   sign of Eq. 3 (``min -MSE``: away from ``x``);

the server concatenates the owners' batches, takes one optimiser step of the remote part on the task loss plus
the fingerprint regulariser (``mu * MSE(s F - X theta)`` on carrier layers that lie in the remote part) and
returns to each owner the gradient of the loss with respect to that owner's activations (``"gradients"``);
each owner back-propagates it through its local part together with its privacy term

- adversarial: ``-lambda_t * min_D MSE(x, D(h))`` (the local part keeps the task while defeating the best of
  its defenders); with ``clip`` the term is ``lambda_t * relu(clip * floor - min_D MSE)``, where ``floor`` is
  the MSE of the owner's mean image, so the push stops once the defenders do no better than the mean image;
- NoPeek: ``lambda_t * dcor(x, h)`` (:func:`~nnmark.split.baselines.distance_correlation`);
- Gaussian / Laplace: noise of scale ``strength`` added to what is sent (no privacy term);

and the owners sum their local-part gradients among themselves (``"local-gradients"``, owner to owner: the
server never sees them), so every owner applies the same step and all hold the same local part.
``lambda_t`` is 0 for the first ``warm_rounds`` rounds, then rises linearly to ``strength`` over
``ramp_rounds`` rounds.

The parties are plain objects (:class:`OwnerParty`, :class:`ServerParty`); :func:`run_rounds` drives them
through a transport -- in this process (:func:`simulate`) or as separate processes
(:mod:`nnmark.split.parties`) -- so both compute exactly the same thing. Every party logs each message it
*receives* (:class:`MessageLog`: sender, kind, shape, dtype, bytes, SHA-256 of the bytes).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nnmark.keys import Key
from nnmark.split import checkpoint as ckpt
from nnmark.split.baselines import NOISES, add_noise, distance_correlation
from nnmark.split.decoders import build_decoder
from nnmark.split.defenders import assign_defenders, defender_spec
from nnmark.split.partition import SplitError, activation_shape, join_parts, split_model

DEFENSES = ("none", "adversarial", "artificial", "nopeek", "gaussian", "laplace")
MESSAGE_KINDS = ("activations", "labels", "gradients", "local-gradients", "local-weights")


@dataclass
class SplitConfig:
    """A partitioned training run (see the module doc).

    ``data``: bundled dataset name (default ``mnist5k``); its train split is dealt to ``owners`` owners in
    equal shards (seeded by ``seed``). ``arch`` + ``arch_overrides``: the zoo network (default MLP with four
    hidden layers of 256 and dropout 0.15); ``at``: the partition point (default ``fc2``: the first two
    layers are local). ``epochs`` over the owners' shards, ``batch_size`` per owner per round, Adam ``lr``
    (model) and ``defender_lr``. ``defense`` in :data:`DEFENSES`, ``strength``: lambda (adversarial,
    artificial, NoPeek) or the noise scale. ``defenders``: ``none/single/multiple/all``
    (:func:`~nnmark.split.defenders.assign_defenders`), ``defender_kinds``: override the kinds;
    ``defender_steps``: defender steps per round; ``warm_rounds``, ``ramp_rounds``, ``clip``: the schedule
    and clipping of the adversarial term (module doc). ``checkpoint_every``: rounds between checkpoints
    (0: none). ``seed``: shards and the shared initialisation. ``keep_payloads``: message logs keep the
    tensors too (for inspection in tests; memory grows with the run).
    """

    data: str = "mnist5k"
    arch: str = "mlp"
    arch_overrides: dict[str, Any] = field(default_factory=lambda: {"hidden": [256, 256, 256, 256], "dropout": 0.15})
    at: str = "fc2"
    owners: int = 3
    epochs: int = 5
    batch_size: int = 32
    lr: float = 1e-3
    defender_lr: float = 1e-3
    defense: str = "none"
    strength: float = 0.0
    defenders: str = "multiple"
    defender_kinds: list[str] | None = None
    defender_steps: int = 1
    warm_rounds: int = 0
    ramp_rounds: int = 0
    clip: float | None = None
    checkpoint_every: int = 0
    seed: int = 0
    keep_payloads: bool = False

    def __post_init__(self) -> None:
        if self.defense not in DEFENSES:
            raise SplitError(f"defense must be one of {', '.join(DEFENSES)}, got {self.defense!r}")
        if not 1 <= self.owners <= 64:
            raise SplitError(f"owners must be 1..64, got {self.owners}")
        if self.epochs < 0 or self.batch_size < 1 or self.defender_steps < 1 or self.strength < 0:
            raise SplitError("epochs >= 0, batch_size >= 1, defender_steps >= 1 and strength >= 0 are required")
        if self.defense in ("adversarial", "artificial") and self.defenders == "none":
            raise SplitError(f"the {self.defense} defence needs defenders (single, multiple or all)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SplitConfig:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def spec(self, image_shape: tuple[int, int, int], num_classes: int) -> dict[str, Any]:
        from nnmark.models import model_spec

        return model_spec(self.arch, image_shape, num_classes, **self.arch_overrides)

    def lam(self, round_: int) -> float:
        """``lambda_t`` of round ``round_`` (0-based)."""
        if round_ < self.warm_rounds:
            return 0.0
        if self.ramp_rounds > 0:
            return self.strength * min(1.0, (round_ - self.warm_rounds + 1) / self.ramp_rounds)
        return self.strength


@dataclass
class FingerprintPlan:
    """What the server embeds while training: the fingerprint ``F`` (``(dim,)``, entries +-1) through a
    :class:`~nnmark.fingerprint.carrier.FingerprintCarrier` on ``layers`` (which must lie in the remote part),
    at level ``scale``, with regulariser weight ``strength`` (``mu``)."""

    key: Key
    fingerprint: np.ndarray
    layers: tuple[str, ...]
    scale: float = 2.0
    strength: float = 5.0


def code_bit_errors(carrier: Any, code: Any, model: nn.Module, j: int) -> tuple[int, int]:
    """``(errors, bits)``: the identity-code bits of codeword ``j`` of AND-ACC ``code`` against the signs of the
    coefficients demodulated from ``carrier.extract(model)`` (the BER of the embedded fingerprint is
    ``errors / bits``)."""
    coef = code.demodulate(carrier.extract(model))
    return int(np.sum(np.sign(coef) != code.signs(j))), int(coef.size)


def digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes (contiguous, native order)."""
    return hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()


class MessageLog:
    """The messages a party received: ``records`` of ``{round, src, dst, kind, shape, dtype, nbytes, sha256}``
    (and ``payload`` when ``keep_payloads``)."""

    def __init__(self, party: str, keep_payloads: bool = False) -> None:
        self.party, self.keep = party, keep_payloads
        self.records: list[dict[str, Any]] = []

    def receive(self, round_: int, src: str, kind: str, t: torch.Tensor) -> torch.Tensor:
        if kind not in MESSAGE_KINDS:
            raise SplitError(f"unknown message kind {kind!r}")
        if not isinstance(t, torch.Tensor):
            raise SplitError(f"a {kind} message from {src} is not a tensor")
        rec = {"round": round_, "src": src, "dst": self.party, "kind": kind, "shape": list(t.shape),
               "dtype": str(t.dtype).replace("torch.", ""), "nbytes": t.numel() * t.element_size(),
               "sha256": digest(t)}
        if self.keep:
            rec["payload"] = t.detach().clone()
        self.records.append(rec)
        return t


def owner_shard(cfg: SplitConfig, owner: int):
    """Owner ``owner``'s shard of the train split, and the dataset's splits (deterministic from ``cfg.seed``)."""
    from nnmark.split.datasets import load_split_data as load_splits

    splits = load_splits(cfg.data)
    perm = np.random.default_rng(cfg.seed).permutation(len(splits.train))
    return splits.train.subset(np.array_split(perm, cfg.owners)[owner], f"{cfg.data}/owner{owner}"), splits


def initial_model(cfg: SplitConfig, image_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """The agreed initial network (every party builds the same one from ``cfg.seed``)."""
    from nnmark.models import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return build_model(cfg.spec(image_shape, num_classes))


class OwnerParty:
    """A data owner: its images, the local part, its defenders (module doc). ``key``: the owner's own key
    (``session_key.child(f"split/owner/{i}")``): batch order, defender initialisation, dropout and noise."""

    def __init__(self, cfg: SplitConfig, index: int, key: Key) -> None:
        self.cfg, self.index, self.name = cfg, index, f"owner{index}"
        self.data, splits = owner_shard(cfg, index)
        self.image_shape = splits.image_shape
        model = initial_model(cfg, self.image_shape, splits.num_classes)
        self.local, _remote = split_model(model, cfg.at)
        self.local.generator = torch.Generator().manual_seed(key.seed("dropout"))
        self.noise_gen = torch.Generator().manual_seed(key.seed("noise"))
        self._order_seed = key.seed("order")
        self.act_shape = activation_shape(self.local, self.image_shape)
        kinds = assign_defenders(cfg.defenders if cfg.defense in ("adversarial", "artificial") else "none",
                                 cfg.owners, self.act_shape, cfg.defender_kinds)[index]
        self.defender_kinds = kinds
        self.defenders = [build_decoder(defender_spec(k, self.act_shape), self.act_shape, self.image_shape,
                                        seed=key.seed(f"defender/{j}")) for j, k in enumerate(kinds)]
        self.def_opts = [torch.optim.Adam(d.parameters(), lr=cfg.defender_lr) for d in self.defenders]
        self.opt = torch.optim.Adam(self.local.parameters(), lr=cfg.lr)
        self.floor = float(((self.data.x - self.data.x.mean(0, keepdim=True)) ** 2).mean())
        self.log = MessageLog(self.name, cfg.keep_payloads)
        self.input_digests: set[str] = set()  # the owner's own record of its raw batches (never sent)
        self._pending: dict[str, Any] = {}
        self.stats: dict[str, float] = {}

    # -- rounds -----------------------------------------------------------------------------------
    def rounds_per_epoch(self) -> int:
        return len(self.data) // self.cfg.batch_size

    def _batch(self, round_: int) -> tuple[torch.Tensor, torch.Tensor]:
        per = self.rounds_per_epoch()
        epoch, b = divmod(round_, per)
        g = torch.Generator().manual_seed(self._order_seed + epoch)
        idx = torch.randperm(len(self.data), generator=g)[b * self.cfg.batch_size:(b + 1) * self.cfg.batch_size]
        return self.data.x[idx], self.data.y[idx]

    def forward(self, round_: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Steps 1-2 of a round: train the defenders, return ``(activations, labels)`` to send."""
        cfg = self.cfg
        x, y = self._batch(round_)
        self.input_digests.add(digest(x))
        self.local.train()
        h = self.local(x)
        if self.defenders:
            sign = -1.0 if cfg.defense == "artificial" else 1.0
            for _ in range(cfg.defender_steps):
                for d, opt in zip(self.defenders, self.def_opts, strict=True):
                    opt.zero_grad()
                    (sign * F.mse_loss(d(h.detach()), x)).backward()
                    opt.step()
        if cfg.defense == "artificial":
            d = self.defenders[round_ % len(self.defenders)]
            with torch.no_grad():
                x_art = d(h.detach())
            h = self.local(x_art)
        sent = h
        if cfg.defense in NOISES:
            sent = add_noise(h, cfg.defense, cfg.strength, self.noise_gen)
        self._pending = {"x": x, "h": h, "round": round_}
        return sent.detach().clone(), y.clone()

    def backward(self, round_: int, grad: torch.Tensor) -> dict[str, torch.Tensor]:
        """Step 3: back-propagate the server's gradient with the privacy term; returns this owner's
        local-part gradients (to be summed among the owners)."""
        cfg = self.cfg
        self.log.receive(round_, "server", "gradients", grad)
        x, h = self._pending["x"], self._pending["h"]
        if tuple(grad.shape) != tuple(h.shape):
            raise SplitError(f"gradient of shape {tuple(grad.shape)} for activations {tuple(h.shape)}")
        self.opt.zero_grad()
        lam = cfg.lam(round_)
        loss = (h * grad).sum()
        if cfg.defense == "adversarial" and lam > 0:
            dist = torch.stack([F.mse_loss(d(h), x) for d in self.defenders]).min()
            priv = F.relu(cfg.clip * self.floor - dist) if cfg.clip is not None else -dist
            loss = loss + lam * priv / cfg.owners
            self.stats["defender_mse"] = float(dist.detach())
        elif cfg.defense == "nopeek" and lam > 0:
            dc = distance_correlation(x, h)
            loss = loss + lam * dc / cfg.owners
            self.stats["dcor"] = float(dc.detach())
        loss.backward()
        self._pending = {}
        return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
                for n, p in self.local.named_parameters()}

    def apply(self, round_: int, *grads: dict[str, torch.Tensor]) -> None:
        """Step 4: sum this owner's gradients with the others' (``grads[i]`` from owner ``i``) and step."""
        total: dict[str, torch.Tensor] = {}
        for j, g in enumerate(grads):
            for n, t in g.items():
                if j != self.index:
                    self.log.receive(round_, f"owner{j}", "local-gradients", t)
                total[n] = total[n] + t if n in total else t.clone()
        for n, p in self.local.named_parameters():
            p.grad = total[n]
        self.opt.step()

    def local_state(self) -> dict[str, torch.Tensor]:
        """The local part's weights (sent once, at the end, to assemble the product)."""
        return {k: v.detach().clone() for k, v in self.local.state_dict().items()}

    def report(self) -> dict[str, Any]:
        return {"party": self.name, "images": len(self.data), "defenders": self.defender_kinds,
                "act_shape": list(self.act_shape), **self.stats}

    def messages(self) -> list[dict[str, Any]]:
        return self.log.records

    def digests(self) -> set[str]:
        return set(self.input_digests)

    def pid(self) -> int:
        import os

        return os.getpid()

    # -- checkpoints ------------------------------------------------------------------------------
    def save(self, directory: str, round_: int) -> None:
        t: dict[str, torch.Tensor] = {f"local.{k}": v for k, v in self.local.state_dict().items()}
        meta: dict[str, Any] = {"opt": ckpt.flatten_optimizer(self.opt, "opt", t), "defs": []}
        for j, (d, o) in enumerate(zip(self.defenders, self.def_opts, strict=True)):
            t.update({f"def{j}.{k}": v for k, v in d.state_dict().items()})
            meta["defs"].append(ckpt.flatten_optimizer(o, f"defopt{j}", t))
        t["rng.dropout"] = self.local.generator.get_state()
        t["rng.noise"] = self.noise_gen.get_state()
        ckpt.save_state(directory, self.name, round_, t, meta)

    def load(self, directory: str, round_: int) -> None:
        t, meta = ckpt.load_state(directory, self.name, round_)
        self.local.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("local.")})
        ckpt.restore_optimizer(self.opt, "opt", t, meta["opt"])
        for j, (d, o) in enumerate(zip(self.defenders, self.def_opts, strict=True)):
            d.load_state_dict({k[len(f"def{j}."):]: v for k, v in t.items() if k.startswith(f"def{j}.")})
            ckpt.restore_optimizer(o, f"defopt{j}", t, meta["defs"][j])
        self.local.generator.set_state(t["rng.dropout"])
        self.noise_gen.set_state(t["rng.noise"])


class ServerParty:
    """The server: the remote part, trained on the owners' activations with the fingerprint regulariser."""

    def __init__(self, cfg: SplitConfig, key: Key, fingerprint: FingerprintPlan | None = None) -> None:
        from nnmark.split.datasets import load_split_data as load_splits

        self.cfg, self.name = cfg, "server"
        splits = load_splits(cfg.data)
        self.image_shape, self.num_classes = splits.image_shape, splits.num_classes
        model = initial_model(cfg, self.image_shape, self.num_classes)
        self.spec = dict(model.spec)
        local, self.remote = split_model(model, cfg.at)
        self.act_shape = activation_shape(local, self.image_shape)
        del local, model
        self.remote.generator = torch.Generator().manual_seed(key.seed("dropout"))
        self.opt = torch.optim.Adam(self.remote.parameters(), lr=cfg.lr)
        self.log = MessageLog(self.name, cfg.keep_payloads)
        self.regs: list[Any] = []
        self.carrier = None
        if fingerprint is not None:
            from nnmark.fingerprint.carrier import FingerprintCarrier

            remote_layers = {n for n, _ in self.remote.named_modules() if n}
            outside = [n for n in fingerprint.layers if n not in remote_layers]
            if outside:
                raise SplitError(f"fingerprint carrier layer(s) {outside} are not in the server's part "
                                 f"(its layers: {', '.join(sorted(remote_layers))})")
            self.carrier = FingerprintCarrier(fingerprint.key, self.remote, fingerprint.layers,
                                              dim=len(fingerprint.fingerprint), scale=fingerprint.scale,
                                              strength=fingerprint.strength)
            self.regs = self.carrier.regularisers(fingerprint.fingerprint, self.remote)
        self.stats: dict[str, float] = {}

    def step(self, round_: int, *batches: tuple[torch.Tensor, torch.Tensor]) -> list[torch.Tensor]:
        """One server step on every owner's ``(activations, labels)``; the gradient for each owner."""
        hs, ys = [], []
        for i, (h, y) in enumerate(batches):
            self.log.receive(round_, f"owner{i}", "activations", h)
            self.log.receive(round_, f"owner{i}", "labels", y)
            if tuple(h.shape[1:]) != self.act_shape or h.dtype != torch.float32:
                raise SplitError(f"owner{i} sent activations of shape {tuple(h.shape)} {h.dtype}; agreed: "
                                 f"(batch, {', '.join(map(str, self.act_shape))}) float32")
            if y.dtype != torch.int64 or y.shape != h.shape[:1]:
                raise SplitError(f"owner{i} sent labels of shape {tuple(y.shape)} {y.dtype}")
            hs.append(h.detach().requires_grad_(True))
            ys.append(y)
        self.remote.train()
        self.opt.zero_grad()
        logits = self.remote(torch.cat(hs))
        task = F.cross_entropy(logits, torch.cat(ys))
        loss = task + sum((r.regularizer(self.remote) for r in self.regs), torch.zeros(()))
        loss.backward()
        self.opt.step()
        self.stats["task_loss"] = float(task.detach())
        return [h.grad.clone() for h in hs]

    def assemble(self, local_state: dict[str, torch.Tensor]) -> nn.Module:
        """The whole network from the owners' final local part and this remote part."""
        for v in local_state.values():
            self.log.receive(-1, "owner0", "local-weights", v)
        model = join_parts(self.spec, local_state, self.remote.state_dict())
        model.eval()
        return model

    def remote_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.remote.state_dict().items()}

    def report(self) -> dict[str, Any]:
        return {"party": self.name, "act_shape": list(self.act_shape), **self.stats}

    def messages(self) -> list[dict[str, Any]]:
        return self.log.records

    def pid(self) -> int:
        import os

        return os.getpid()

    def save(self, directory: str, round_: int) -> None:
        t: dict[str, torch.Tensor] = {f"remote.{k}": v for k, v in self.remote.state_dict().items()}
        meta = {"opt": ckpt.flatten_optimizer(self.opt, "opt", t)}
        t["rng.dropout"] = self.remote.generator.get_state()
        ckpt.save_state(directory, self.name, round_, t, meta)

    def load(self, directory: str, round_: int) -> None:
        t, meta = ckpt.load_state(directory, self.name, round_)
        self.remote.load_state_dict({k[7:]: v for k, v in t.items() if k.startswith("remote.")})
        ckpt.restore_optimizer(self.opt, "opt", t, meta["opt"])
        self.remote.generator.set_state(t["rng.dropout"])


# -- driving the parties ---------------------------------------------------------------------------
class InProcess:
    """Transport for parties in this process: a call is a method call."""

    def call(self, party: Any, method: str, *args: Any, returns: int = 1) -> Any:
        return getattr(party, method)(*args)

    def get(self, x: Any) -> Any:
        return x


@dataclass
class SplitResult:
    """A finished run: the assembled ``model``, its test ``accuracy``, ``rounds`` run, wall ``seconds``,
    per-party ``reports``, and the number of restarts from checkpoints."""

    model: nn.Module
    accuracy: float
    rounds: int
    seconds: float
    reports: list[dict[str, Any]]
    restarts: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def total_rounds(cfg: SplitConfig) -> int:
    """Rounds of a run: ``epochs`` times the rounds of one epoch (the smallest owner shard's batches)."""
    from nnmark.split.datasets import load_split_data as load_splits

    n = len(load_splits(cfg.data).train)
    per = min(len(s) for s in np.array_split(np.arange(n), cfg.owners)) // cfg.batch_size
    return cfg.epochs * per


def run_rounds(cfg: SplitConfig, transport: Any, owners: list[Any], server: Any, start: int, stop: int,
               checkpoint_dir: str | None = None,
               progress: Callable[[int, int, list[dict[str, Any]]], None] | None = None,
               every: int = 0) -> None:
    """Rounds ``start .. stop - 1`` (module doc) through ``transport``; checkpoints every
    ``cfg.checkpoint_every`` rounds into ``checkpoint_dir``; ``progress(round, stop, reports)`` every
    ``every`` rounds."""
    n = len(owners)
    for r in range(start, stop):
        sent = [transport.call(o, "forward", r) for o in owners]
        grads = transport.call(server, "step", r, *sent, returns=n)
        local = [transport.call(o, "backward", r, g) for o, g in zip(owners, grads, strict=True)]
        transport.get([transport.call(o, "apply", r, *local) for o in owners])
        if checkpoint_dir and cfg.checkpoint_every and (r + 1) % cfg.checkpoint_every == 0:
            transport.get([transport.call(p, "save", checkpoint_dir, r + 1) for p in [*owners, server]])
            ckpt.write_manifest(checkpoint_dir, r + 1, {"config": cfg.to_dict()})
            ckpt.prune(checkpoint_dir, r + 1)
        if progress and every and ((r + 1) % every == 0 or r + 1 == stop):
            progress(r + 1, stop, transport.get([transport.call(p, "report") for p in [*owners, server]]))


def party_keys(session_key: Key, n_owners: int) -> tuple[list[Key], Key]:
    """Per-party keys: ``split/owner/<i>`` for each owner, ``split/server`` for the server."""
    return [session_key.child(f"split/owner/{i}") for i in range(n_owners)], session_key.child("split/server")


def evaluate(model: nn.Module, cfg: SplitConfig) -> float:
    """Accuracy of the assembled network on the dataset's test split."""
    from nnmark.split.datasets import load_split_data as load_splits
    from nnmark.train import accuracy

    return float(accuracy(model, load_splits(cfg.data).test))


def simulate(cfg: SplitConfig, session_key: Key, fingerprint: FingerprintPlan | None = None, *,
             checkpoint_dir: str | None = None,
             progress: Callable[[int, int, list[dict[str, Any]]], None] | None = None, every: int = 0,
             keep: bool = False) -> SplitResult | tuple[SplitResult, list[OwnerParty], ServerParty]:
    """Run the protocol with every party in this process (resuming from ``checkpoint_dir``'s manifest when
    there is one). ``keep=True`` also returns the party objects (for inspection)."""
    t0 = time.perf_counter()
    okeys, skey = party_keys(session_key, cfg.owners)
    owners = [OwnerParty(cfg, i, k) for i, k in enumerate(okeys)]
    server = ServerParty(cfg, skey, fingerprint)
    start = 0
    man = ckpt.read_manifest(checkpoint_dir) if checkpoint_dir else None
    if man:
        start = int(man["round"])
        for p in [*owners, server]:
            p.load(checkpoint_dir, start)
    stop = total_rounds(cfg)
    run_rounds(cfg, InProcess(), owners, server, start, stop, checkpoint_dir, progress, every)
    model = server.assemble(owners[0].local_state())
    res = SplitResult(model, evaluate(model, cfg), stop, time.perf_counter() - t0,
                      [o.report() for o in owners] + [server.report()])
    return (res, owners, server) if keep else res
