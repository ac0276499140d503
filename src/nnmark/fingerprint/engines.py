"""Fan-out of issuing over workers: ``local`` (this process, or a process pool) and ``ray``.

Workers never receive the key: each opens the product from its directory (or
registry URL) and reads the key file itself, so the product must be on a file system
every worker sees (true for a local pool and a local Ray cluster; for a multi-host
Ray cluster, use a shared file system and a database URL such as PostgreSQL). The
registry's atomic reservation guarantees that no two workers hand out one code.

Each worker issues its customers one after the other and reports, per customer,
either the :class:`~nnmark.registry.IssuedCopy` or the one-line error it met; one
customer's failure does not stop the others.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from nnmark.fingerprint.carrier import FingerprintError
from nnmark.registry import IssuedCopy

ENGINES = ("local", "ray")


@dataclass(frozen=True)
class IssueOutcome:
    """One customer's result: ``copy`` on success, else ``error`` (one line)."""

    customer: str
    copy: IssuedCopy | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.copy is not None


def _issue_batch(product: str, key_file: str | None, customers: Sequence[str], threads: int = 1
                 ) -> list[IssueOutcome]:
    """Open the product and issue to ``customers`` in order (runs inside a worker)."""
    import torch

    from nnmark.errors import NNMarkError
    from nnmark.fingerprint.product import Product

    torch.set_num_threads(max(1, int(threads)))
    prod = Product.open(product, key_file=key_file)
    out = []
    for name in customers:
        try:
            out.append(IssueOutcome(name, prod.issue(name)))
        except (NNMarkError, OSError, ValueError) as exc:
            out.append(IssueOutcome(name, None, f"{type(exc).__name__}: {exc}"))
    return out


def _split(items: Sequence[str], n: int) -> list[list[str]]:
    n = max(1, min(n, len(items)))
    return [list(items[i::n]) for i in range(n)]


def issue_many(product: str | Path, customers: Sequence[str], *, engine: str = "local", workers: int = 1,
               key_file: str | Path | None = None, ray_address: str | None = None) -> list[IssueOutcome]:
    """Issue a copy to each of ``customers`` with ``engine``.

    ``local``: ``workers == 1`` issues in this process; more uses a process pool
    (spawned processes, one torch thread each). ``ray``: one Ray task per batch of
    customers, ``workers`` batches; connects to ``ray_address`` (or ``RAY_ADDRESS``), else
    starts a local Ray instance with ``num_cpus=workers`` (and shuts it down afterwards).
    Returns one :class:`IssueOutcome` per customer, in the order given.
    """
    if engine not in ENGINES:
        raise FingerprintError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if workers < 1:
        raise FingerprintError("workers must be >= 1")
    customers = [str(c) for c in customers]
    if not customers:
        return []
    prod, kf = str(product), None if key_file is None else str(key_file)
    batches = _split(customers, workers)
    if engine == "local":
        if workers == 1:
            results = [_issue_batch(prod, kf, customers, threads=_threads())]
        else:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(len(batches), mp_context=mp.get_context("spawn")) as pool:
                results = list(pool.map(_issue_batch, [prod] * len(batches), [kf] * len(batches), batches))
    else:
        results = _run_ray(prod, kf, batches, workers, ray_address)
    by_name = {o.customer: o for batch in results for o in batch}
    return [by_name[c] for c in customers]


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _run_ray(product: str, key_file: str | None, batches: list[list[str]], workers: int,
             address: str | None) -> list[list[IssueOutcome]]:
    try:
        import ray
    except ImportError:
        raise FingerprintError("the ray engine needs the 'ray' package: pip install 'nnmark[ray]'") from None
    started = False
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        else:
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
            started = True
    try:
        task = ray.remote(num_cpus=1)(_issue_batch)
        return ray.get([task.remote(product, key_file, b) for b in batches])
    finally:
        if started:
            ray.shutdown()
