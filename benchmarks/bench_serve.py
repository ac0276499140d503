"""Loopback load test of the prediction server (``python -m nnmark.serving``).

Starts the server in a separate process on 127.0.0.1 (a free port), then sends a
fixed number of ``POST /predict`` requests from concurrent clients (one
keep-alive connection each), every request a batch of images from the test split,
and checks every answer against the same model run locally. Reports errors,
throughput, latency percentiles and the server's resident memory (VmRSS from
``/proc/PID/status``) before and after. Prints a table and writes JSON.

    python benchmarks/bench_serve.py                      # 1,000 requests, 8 clients, 16 images each
    python benchmarks/bench_serve.py --requests 200 --clients 4 --batch 64 --model my.safetensors

By default the served model is the paper's CNN (conv32-32-64-64, dense 256/256)
for mnist5k's 28x28 digits with seeded, untrained weights: serving cost does not
depend on the weights' values.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests
import torch

from nnmark.data import load_splits
from nnmark.io import load_model, save_model
from nnmark.models import model_spec
from nnmark.train import predict, seeded_model

RESULTS = Path(__file__).resolve().parent / "results" / "serve.json"


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """A memory field of ``/proc/PID/status`` in MB (1e6 bytes)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / 1e6
    raise RuntimeError(f"{field} not found for pid {pid}")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds used so far by process ``pid`` (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(model_path: Path, max_batch: int, threads: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "nnmark.serving", str(model_path), "--host", "127.0.0.1", "--port", "0",
         "--max-batch", str(max_batch), "--threads", str(threads)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
    try:
        line = lines.get(timeout=120)
    except queue.Empty:
        proc.kill()
        raise SystemExit("server did not start within 120 s") from None
    if "http://" not in line:
        proc.wait(10)
        raise SystemExit(f"server failed to start: {proc.stderr.read().strip()}")
    return proc, line.split("at ", 1)[1].split()[0]


def run_load(url: str, bodies: list[bytes], expected: list[list[int]], total: int, clients: int,
             timeout: float) -> tuple[list[float], list[str], float]:
    """Send ``total`` requests from ``clients`` threads; return (latencies s, errors, wall s)."""
    counter = iter(range(total))
    lock = threading.Lock()
    latencies: list[float] = []
    errors: list[str] = []

    def client() -> None:
        with requests.Session() as session:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                k = i % len(bodies)
                t0 = time.perf_counter()
                try:
                    r = session.post(url + "/predict", data=bodies[k], timeout=timeout,
                                     headers={"Content-Type": "application/json"})
                    ok = r.status_code == 200 and r.json().get("labels") == expected[k]
                    err = None if ok else f"HTTP {r.status_code}: {r.text[:100]}"
                except (requests.RequestException, ValueError) as exc:
                    err = f"{type(exc).__name__}: {str(exc)[:100]}"
                dt = time.perf_counter() - t0
                with lock:
                    latencies.append(dt)
                    if err:
                        errors.append(err)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, errors, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=1000, help="requests in the measured run (default 1000)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    ap.add_argument("--batch", type=int, default=16, help="images per request (default 16)")
    ap.add_argument("--warmup", type=int, default=50, help="requests before the measured run (default 50)")
    ap.add_argument("--model", type=Path, default=None, help="model file (default: seeded CNN for mnist5k)")
    ap.add_argument("--dataset", default="mnist5k", help="images to send (default mnist5k test split)")
    ap.add_argument("--threads", type=int, default=1, help="server torch threads (default 1)")
    ap.add_argument("--timeout", type=float, default=30.0, help="per-request timeout, s (default 30)")
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"JSON output (default {RESULTS})")
    args = ap.parse_args()
    if min(args.requests, args.clients, args.batch) < 1 or args.warmup < 0:
        ap.error("--requests, --clients and --batch must be >= 1, --warmup >= 0")

    test = load_splits(args.dataset).test
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model
        if path is None:
            spec = model_spec("cnn", test.image_shape, 10)
            path = save_model(Path(tmp) / "cnn.safetensors", seeded_model(spec, 0))
        model, _ = load_model(path)
        # A pool of distinct request bodies, encoded once, with the labels the model gives locally.
        rng = np.random.default_rng(0)
        bodies, expected = [], []
        for _ in range(64):
            x = test.x[torch.from_numpy(rng.choice(len(test), size=args.batch, replace=False))]
            bodies.append(json.dumps({"images": x.numpy().tolist()}, separators=(",", ":")).encode())
            expected.append(predict(model, x).tolist())

        proc, url = start_server(Path(path), max(args.batch, 256), args.threads)
        try:
            rss_start = rss_mb(proc.pid)
            run_load(url, bodies, expected, args.warmup, args.clients, args.timeout)
            rss_warm = rss_mb(proc.pid)
            load_before = os.getloadavg()[0]
            cpu0 = cpu_s(proc.pid)
            lat, errors, wall = run_load(url, bodies, expected, args.requests, args.clients, args.timeout)
            server_cpu = cpu_s(proc.pid) - cpu0
            rss_end, rss_peak = rss_mb(proc.pid), rss_mb(proc.pid, "VmHWM")
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    ms = np.array(lat) * 1e3
    result = {
        "command": "python " + " ".join([os.path.relpath(sys.argv[0]), *sys.argv[1:]]),
        "config": {"requests": args.requests, "clients": args.clients, "images_per_request": args.batch,
                   "warmup_requests": args.warmup, "dataset": args.dataset, "server_torch_threads": args.threads,
                   "model": str(args.model) if args.model else "cnn (seeded, untrained) for mnist5k",
                   "request_body_bytes_mean": float(np.mean([len(b) for b in bodies]))},
        "machine": {"cpus": len(os.sched_getaffinity(0)), "python": platform.python_version(),
                    "torch": torch.__version__, "platform": platform.platform()},
        "errors": len(errors),
        "error_examples": errors[:5],
        "wall_s": round(wall, 3),
        "requests_per_s": round(len(lat) / wall, 1),
        "images_per_s": round(len(lat) * args.batch / wall, 1),
        "server_cpu_ms_per_request": round(1e3 * server_cpu / len(lat), 2),
        "load_average_1min_before": round(load_before, 2),
        "latency_ms": {f"p{q}": round(float(np.percentile(ms, q)), 2) for q in (50, 90, 99)}
        | {"max": round(float(ms.max()), 2)},
        "server_rss_mb": {"start": round(rss_start, 1), "after_warmup": round(rss_warm, 1),
                          "end": round(rss_end, 1), "peak": round(rss_peak, 1),
                          "growth": round(rss_end - rss_start, 1),
                          "growth_after_warmup": round(rss_end - rss_warm, 1)},
    }
    rows = [
        ("requests x images", f"{args.requests} x {args.batch} from {args.clients} clients"),
        ("errors", str(result["errors"])),
        ("throughput", f"{result['requests_per_s']} req/s, {result['images_per_s']} images/s"),
        ("latency p50 / p90 / p99", " / ".join(f"{result['latency_ms'][f'p{q}']} ms" for q in (50, 90, 99))),
        ("server CPU per request", f"{result['server_cpu_ms_per_request']} ms "
                                   f"(machine load average {load_before:.1f} before the run)"),
        ("server RSS start -> end", f"{rss_start:.1f} -> {rss_end:.1f} MB (growth {rss_end - rss_start:+.1f} MB, "
                                    f"{rss_end - rss_warm:+.1f} after warm-up)"),
    ]
    width = max(len(k) for k, _ in rows)
    print("nnmark serve loopback load test")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    if errors:
        print("first errors: " + "; ".join(errors[:3]), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
