"""What per-output refinement costs at serving time, side by side in one run with the host alone and with a
mark head.

    .venv/bin/python benchmarks/bench_refine.py [--reps 3] [--threads 1]

For a batch of 64 inputs of a width-32 sr2 U-Net (32 px outputs, what the experiments serve), the median over
``--reps`` alternated repetitions of the time per output of:

- the host alone;
- the host followed by a width-32 ``MarkHead`` (one forward pass);
- the host, then ``refine_outputs`` for 50 and for 200 steps (one mark, undistorted), and for 200 steps with
  the luma2 companion mark through the named threats (the robust setting of round 8);
- the CLI's ``generate --robust`` recipe (200 steps, luma2 companion, strength-1 random distortions, crop
  weight 1) with crop read-out centres looked up on the default 4 px grid and exactly (``centre_grid`` 4 / 1).
  Each new crop geometry costs one 512-patch decoder pass, cached per process: after the warm-up the 4 px grid
  has met nearly all of its ~100 geometries, while exact centres keep meeting new ones (thousands exist), which
  is what a serving process sees in its first hour.

Ratios to the host alone are taken per repetition, then the median. The host and head are untrained (the
timing does not depend on the weights); refinement reads the shipped decoder. Writes
benchmarks/results/refine.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

LUMA2 = Path("experiments/results/outputs/extractor48_luma2.safetensors")


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/refine.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from nnmark.keys import Key
    from nnmark.outputs.agnostic import OutputMessage
    from nnmark.outputs.hosts import host_for_task
    from nnmark.outputs.mark_head import MarkedHost, MarkHead, budget_for_psnr
    from nnmark.outputs.refine import NAMED_THREATS, refine_outputs

    host = host_for_task("sr2", "unet", width=32, seed=0).eval()
    headed = MarkedHost(host, MarkHead(32, budget_for_psnr(35.3))).eval()
    scheme = OutputMessage.create(Key.from_seed("bench-refine"), None)
    companion = OutputMessage.create(Key.from_seed("bench-refine-companion"), None, extractor=str(LUMA2))
    x = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    calls = iter(range(1_000_000))

    def serve_refined(steps: int, dual: bool = False) -> None:
        with torch.no_grad():
            clean = host(x).clamp(0, 1)
        refine_outputs(scheme, clean, psnr=35.3, steps=steps, chunk=64,
                       companions=[companion] if dual else [], companion_weight=1.5,
                       distortions=NAMED_THREATS if dual else None)

    def serve_robust(centre_grid: int) -> None:  # every call draws other crops (another seed), as serving would
        with torch.no_grad():
            clean = host(x).clamp(0, 1)
        refine_outputs(scheme, clean, psnr=35.3, steps=200, chunk=64, companions=[companion], companion_weight=1.5,
                       strength=1.0, crop_weight=1.0, centre_grid=centre_grid, seed=next(calls))

    def no_grad(m):
        def run() -> None:
            with torch.no_grad():
                m(x)
        return run

    cases = {"host": no_grad(host), "head32": no_grad(headed), "refine50": lambda: serve_refined(50),
             "refine200": lambda: serve_refined(200), "refine200_dual_threats": lambda: serve_refined(200, True),
             "robust_centre_grid4": lambda: serve_robust(4), "robust_exact_centres": lambda: serve_robust(1)}
    for fn in cases.values():  # warm-up (and the crop-geometry centres the threats' crops need, once)
        fn()
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(args.reps):
        for name, fn in cases.items():
            reps = 20 if name in ("host", "head32") else 1
            times[name].append(sum(timed(fn) for _ in range(reps)) / reps / len(x))
    row = {f"{k}_ms_per_output": statistics.median(v) * 1e3 for k, v in times.items()}
    for k in cases:
        if k != "host":
            row[f"ratio_{k}"] = statistics.median(a / b for a, b in zip(times[k], times["host"], strict=True))
    result = {"threads": args.threads, "reps": args.reps, "batch": len(x), "output_px": 32, "serving": row}
    print("serving, ms per 32 px output (ratio to the host alone): "
          + ", ".join(f"{k} {row[f'{k}_ms_per_output']:.2f}" + (f" ({row[f'ratio_{k}']:.1f}x)" if k != "host" else "")
                      for k in cases))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
