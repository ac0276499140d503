"""Run a plan: build the hosts, run the cells, run the false-alarm study -- in this process, over processes on
this machine, or over a Ray cluster.

Fan-out: ``workers == 1`` runs everything in this process; ``workers > 1`` uses a
:class:`concurrent.futures.ProcessPoolExecutor` with the ``spawn`` start method (each worker on one torch
thread); a plan with ``ray: {address: ...}`` submits the same tasks as Ray remote functions (``address:
auto`` joins a running cluster, ``local`` starts one on this machine). Results come back to this process,
which alone appends them to ``results.jsonl`` (:class:`~nnmark.harness.grid.ResultsLog`), so records never
interleave. Order of work: (1) the distinct hosts the remaining cells need (each built once: the artifact
store's lock), (2) the cells, (3) the false-alarm checks, (4) the forgeries, (5) the tracer's traces. A rerun
skips every recorded cell and check.

Several runs on one output folder: every cell, check, forgery and trace is claimed by an exclusive lock file
(``<out>/locks/<id>.lock``, :mod:`nnmark.harness.claims`) held from its start until its record is appended, so
no two runs ever both run it; a run that finds one locked comes back to it at the end and reads the holder's
record. The kernel releases a killed run's locks, so its unfinished item is done by the next run.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from nnmark.harness.cache import ArtifactStore
from nnmark.harness.claims import Claims, LogTail
from nnmark.harness.config import Plan, content_hash
from nnmark.harness.grid import Cell, ResultsLog, build_artifact, cells, clean_recipe, marked_recipe, needs_references
from nnmark.keyfile import write_atomically

Progress = Callable[[str, int, int], None]


def _die_with_parent() -> None:
    """On Linux, have the kernel SIGKILL this worker when the process that spawned it dies (a killed
    ``nnmark evaluate`` leaves no orphan training on); elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _init_worker(paths: list[str]) -> None:
    import torch

    torch.set_num_threads(1)
    for p in reversed(paths):
        if p not in sys.path:
            sys.path.insert(0, p)


def _pool_worker(paths: list[str]) -> None:
    _die_with_parent()
    _init_worker(paths)


def _task(kind: str, plan_dict: dict[str, Any], store_root: str, payload: dict[str, Any]) -> dict[str, Any]:
    """One unit of work (top level, so that spawned processes and Ray can import it)."""
    plan = Plan.from_dict(plan_dict)
    _init_worker(plan.paths)
    store = ArtifactStore(store_root)
    if kind == "artifact":
        return {"address": store.address(payload["recipe"]), "hit": build_artifact(plan, store, payload["recipe"])}
    if kind == "cell":
        s, a = plan.schemes[payload["scheme"]], plan.attacks[payload["attack"]]
        from nnmark.harness.grid import run_cell

        return run_cell(plan, store, Cell(s, a, payload["budget"], payload["seed"]))
    if kind == "false_alarm":
        from nnmark.harness.falsealarm import run_check

        return run_check(plan, store, payload)
    if kind == "forgery":
        from nnmark.harness.forgery import run_forgery

        return run_forgery(plan, store, payload)
    raise ValueError(f"unknown task kind {kind!r}")


class FanOut:
    """Runs ``_task`` calls in this process, in spawned processes, or on Ray (see the module docs)."""

    def __init__(self, plan: Plan, store_root: Path, workers: int) -> None:
        self.plan, self.root, self.workers = plan, str(store_root), max(1, int(workers))
        self.plan_dict = plan.to_dict()
        self._pool: ProcessPoolExecutor | None = None
        self._ray: Any = None
        if plan.ray:
            import ray

            address = plan.ray.get("address", "auto")
            if not ray.is_initialized():
                kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
                if address == "local":
                    kwargs["num_cpus"] = plan.ray.get("num_cpus", self.workers)
                else:
                    kwargs["address"] = address
                ray.init(runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}}, **kwargs)
            self._ray = ray.remote(num_cpus=1)(_task)
        elif self.workers > 1:
            import multiprocessing

            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_pool_worker, initargs=(plan.paths,))

    @property
    def mode(self) -> str:
        return "ray" if self._ray is not None else "processes" if self._pool is not None else "in-process"

    def run(self, kind: str, payloads: list[dict[str, Any]], on_result: Callable[[dict[str, Any]], None]) -> None:
        """Run every payload; ``on_result`` is called here, in this process, as each one finishes."""
        if not payloads:
            return
        if self._ray is not None:
            ray = sys.modules["ray"]
            pending = [self._ray.remote(kind, self.plan_dict, self.root, p) for p in payloads]
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    on_result(ray.get(ref))
            return
        if self._pool is None:
            for p in payloads:
                on_result(_task(kind, self.plan_dict, self.root, p))
            return
        futures = {self._pool.submit(_task, kind, self.plan_dict, self.root, p) for p in payloads}
        while futures:
            done, futures = wait(futures, return_when=FIRST_COMPLETED)
            for f in done:
                on_result(f.result())

    def _window(self) -> int:
        """How many claimed items may be in flight at once: one per worker (on Ray: per CPU of the cluster)."""
        if self._ray is not None:
            cpus = sys.modules["ray"].cluster_resources().get("CPU", self.workers)
            return max(self.workers, int(cpus))
        return self.workers if self._pool is not None else 1

    def _start(self, kind: str, payload: dict[str, Any]) -> Any:
        if self._ray is not None:
            return self._ray.remote(kind, self.plan_dict, self.root, payload)
        if self._pool is not None:
            return self._pool.submit(_task, kind, self.plan_dict, self.root, payload)
        done: Future[dict[str, Any]] = Future()
        done.set_result(_task(kind, self.plan_dict, self.root, payload))
        return done

    def _finished(self, handles: list[Any], timeout: float | None) -> list[tuple[Any, dict[str, Any]]]:
        """The handles among ``handles`` that finished within ``timeout`` seconds, with their results."""
        if self._ray is not None:
            ray = sys.modules["ray"]
            done, _ = ray.wait(handles, num_returns=1, timeout=timeout)
            return [(h, ray.get(h)) for h in done]
        done_set, _ = wait(handles, timeout=timeout, return_when=FIRST_COMPLETED)
        return [(h, h.result()) for h in done_set]

    def run_claimed(self, kind: str, payloads: list[dict[str, Any]], on_result: Callable[[dict[str, Any]], None],
                    ident: Callable[[dict[str, Any]], str], claims: Claims, recorded: LogTail,
                    poll_seconds: float = 0.25) -> dict[str, int]:
        """Run every payload that no other run records, each under its claim (:mod:`nnmark.harness.claims`):
        claimed just before it starts, released once ``on_result`` (which appends its record) returned. A
        payload found locked is put aside and tried again, without blocking, once the others are started; when
        its lock comes free its holder's record is read (or, if the holder died without one, it is run here).
        Returns ``{"ran": ..., "by_other_runs": ..., "waited": ...}``: items run here, items another run
        recorded after this run's first look, and items this run found locked at least once."""
        queue, deferred, flight = list(payloads), [], {}
        counts = {"ran": 0, "by_other_runs": 0, "waited": 0}
        window = self._window()

        def claim(p: dict[str, Any]) -> bool | None:
            """``True``: claimed, ``None``: recorded elsewhere meanwhile, ``False``: locked by another run."""
            i = ident(p)
            if i in recorded:
                counts["by_other_runs"] += 1
                return None
            if not claims.try_claim(i):
                return False
            if i in recorded:  # finished by its holder between our first look and our claim
                claims.release(i)
                counts["by_other_runs"] += 1
                return None
            return True

        try:
            while queue or deferred or flight:
                while len(flight) < window and queue:
                    p = queue.pop(0)
                    got = claim(p)
                    if got is False:
                        deferred.append(p)
                        counts["waited"] += 1
                    elif got:
                        flight[self._start(kind, p)] = ident(p)
                if not queue:
                    for p in list(deferred):
                        if len(flight) >= window:
                            break
                        got = claim(p)
                        if got is not False:
                            deferred.remove(p)
                        if got:
                            flight[self._start(kind, p)] = ident(p)
                if flight:
                    for handle, result in self._finished(list(flight), poll_seconds if deferred else None):
                        on_result(result)
                        counts["ran"] += 1
                        claims.release(flight.pop(handle))
                elif deferred:
                    time.sleep(poll_seconds)
        finally:
            for i in list(flight.values()):
                claims.release(i)
        return counts

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def _fsync_append(path: Path, obj: dict[str, Any]) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(obj, sort_keys=True, default=str) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def run_plan(plan: Plan, out: str | Path, *, workers: int | None = None, progress: Progress | None = None,
             command: str | None = None) -> dict[str, Any]:
    """Run what ``plan`` still lacks under ``out`` (``results.jsonl``, ``false_alarm.jsonl``, ``artifacts/``);
    returns this run's summary, which is also appended to ``out/runs.jsonl``: cells in the grid, skipped
    (recorded before this run started), run (here), by other runs (recorded by a concurrent run meanwhile),
    waited (found locked at least once), errors, hosts built and found in the cache, false-alarm checks and
    forgeries run here, seconds, and ``command`` (the command line that started it, when given)."""
    from nnmark.harness.falsealarm import FalseAlarmLog, checks
    from nnmark.harness.forgery import forgery_checks

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomically(out / "plan.json", json.dumps(plan.to_dict(), indent=1, sort_keys=True, default=str).encode(),
                     0o644)
    start = time.perf_counter()
    store_root = out / "artifacts"
    log = ResultsLog(out / "results.jsonl")
    done = log.finished()
    all_cells = cells(plan)
    todo = [c for c in all_cells if c.ident(plan) not in done]
    fa_log = FalseAlarmLog(out / "false_alarm.jsonl")
    fa_todo = [c for c in checks(plan) if c["check"] not in fa_log.finished()] if plan.false_alarm else []
    fg_log = FalseAlarmLog(out / "forgery.jsonl", key="forgery")
    fg_todo = [c for c in forgery_checks(plan) if c["forgery"] not in fg_log.finished()] if plan.forgery else []
    summary: dict[str, Any] = {"cells": len(all_cells), "skipped": len(all_cells) - len(todo), "ran": 0, "errors": 0,
                               "by_other_runs": 0, "waited": 0, "hosts_built": 0, "hosts_cached": 0,
                               "false_alarm_checks": 0, "forgery_checks": 0, "pid": os.getpid()}
    if command:
        summary["command"] = command
    claims = Claims(out / "locks")

    recipes: dict[str, dict[str, Any]] = {}
    ref_labels = {s.label for s in plan.schemes if needs_references(plan, s)}
    for c in todo:
        r = marked_recipe(plan, c.scheme, c.seed)
        recipes[content_hash(r)] = r
    if any(c.scheme.label in ref_labels for c in todo) or \
            any(plan.schemes[c["scheme"]].label in ref_labels for c in fa_todo):
        for s in plan.references:
            r = clean_recipe(plan, s)
            recipes[content_hash(r)] = r
    for chk in fa_todo + fg_todo:
        for r in chk["artifacts"]:
            recipes[content_hash(r)] = r

    fan = FanOut(plan, store_root, workers if workers is not None else plan.workers)
    summary["mode"] = fan.mode
    try:
        n = len(recipes)
        count = [0]

        def host_done(res: dict[str, Any]) -> None:
            count[0] += 1
            summary["hosts_cached" if res["hit"] else "hosts_built"] += 1
            if progress:
                progress("hosts", count[0], n)

        if progress:
            progress("hosts", 0, n)
        fan.run("artifact", [{"recipe": r} for r in recipes.values()], host_done)

        index = {(id(s)): i for i, s in enumerate(plan.schemes)}
        aindex = {(id(a)): i for i, a in enumerate(plan.attacks)}
        payloads = [{"scheme": index[id(c.scheme)], "attack": aindex[id(c.attack)], "budget": c.budget,
                     "seed": c.seed, "cell": c.ident(plan)} for c in todo]
        count[0] = 0

        def cell_done(rec: dict[str, Any]) -> None:
            log.append(rec)
            count[0] += 1
            summary["errors"] += rec.get("status") == "error"
            if progress:
                progress("cells", count[0], len(todo))

        if progress:
            progress("cells", 0, len(todo))
        got = fan.run_claimed("cell", payloads, cell_done, lambda p: p["cell"], claims,
                              LogTail(log.path, "cell", lambda r: r.get("status") != "error"))
        summary["ran"], summary["by_other_runs"], summary["waited"] = got["ran"], got["by_other_runs"], got["waited"]

        count[0] = 0

        def check_done(rec: dict[str, Any]) -> None:
            fa_log.append(rec)
            count[0] += 1
            if progress:
                progress("false alarms", count[0], len(fa_todo))

        if fa_todo and progress:
            progress("false alarms", 0, len(fa_todo))
        got = fan.run_claimed("false_alarm", fa_todo, check_done, lambda c: c["check"], claims,
                              LogTail(fa_log.path, "check"))
        summary["false_alarm_checks"] = got["ran"]

        count[0] = 0

        def forgery_done(rec: dict[str, Any]) -> None:
            fg_log.append(rec)
            count[0] += 1
            if progress:
                progress("forgeries", count[0], len(fg_todo))

        got = fan.run_claimed("forgery", fg_todo, forgery_done, lambda c: c["forgery"], claims,
                              LogTail(fg_log.path, "forgery"))
        summary["forgery_checks"] = got["ran"]
    finally:
        fan.close()
        claims.release_all()
    if plan.fingerprint:
        from nnmark.harness.tracing import run_tracing

        summary["traces"] = run_tracing(plan, store_root, out, progress, claims)["ran"]
    summary["seconds"] = time.perf_counter() - start
    summary["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    _fsync_append(out / "runs.jsonl", summary)
    return summary
