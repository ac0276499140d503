"""What a mark head costs, side by side in one run: serving a host with and without its head, and training a
head vs fine-tuning the host for the same number of images.

    .venv/bin/python benchmarks/bench_mark_head.py [--reps 5] [--threads 1]

- Serving: the median over ``--reps`` alternated repetitions of the time per output of a width-32 sr2 U-Net
  host alone and of the same host followed by a ``MarkHead`` of width 32 and of width 64, at 32 px (the
  patches the experiments use) and 256 px outputs; the ratio head / host is per repetition, then the median.
- Marking: one step of ``train_mark_head`` (batch 32 of 32 px images, decoder forward and backward, random
  distortions) vs one step of ``OutputMessage.embed_host`` on the same host (batch 32: host and reference
  forward, decoder, host backward), alternated, ``--reps`` timed blocks of 10 steps each.
- Verification: the time per 32 px output of ``OutputMessage.p_values`` (one decoder pass and the test).

Hosts are untrained (the timing does not depend on the weights). Writes benchmarks/results/mark_head.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def per_call(fn, n: int) -> float:
    """Seconds per call of ``fn`` over ``n`` calls (after one warm-up call)."""
    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/mark_head.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from nnmark.keys import Key
    from nnmark.outputs.agnostic import OutputMessage
    from nnmark.outputs.data import natural_images, photo_patches
    from nnmark.outputs.hosts import host_for_task
    from nnmark.outputs.mark_head import MarkedHost, MarkHead, budget_for_psnr, train_mark_head

    host = host_for_task("sr2", "unet", width=32, seed=0).eval()
    heads = {w: MarkedHost(host, MarkHead(w, budget_for_psnr(35.3))).eval() for w in (32, 64)}
    result: dict = {"threads": args.threads, "reps": args.reps, "serving": {}, "marking": {}}
    for side, batch, n in ((32, 64, 20), (256, 4, 5)):
        x = torch.rand(batch, 3, side // 2, side // 2)  # sr2 doubles the side
        times: dict[str, list[float]] = {"host": [], "head32": [], "head64": []}
        with torch.no_grad():
            for _ in range(args.reps):
                times["host"].append(per_call(lambda x=x: host(x), n) / batch)
                for w, m in heads.items():
                    times[f"head{w}"].append(per_call(lambda m=m, x=x: m(x), n) / batch)
        row = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        for w in (32, 64):
            row[f"ratio_head{w}"] = statistics.median(h / b for h, b in zip(times[f"head{w}"], times["host"],
                                                                            strict=True))
        result["serving"][f"{side}px"] = row
        print(f"serving {side} px: host {row['host']:.3f} ms/output, with a width-32 head {row['head32']:.3f} "
              f"({row['ratio_head32']:.2f}x), width-64 {row['head64']:.3f} ({row['ratio_head64']:.2f}x)")

    scheme = OutputMessage.create(Key.from_seed("bench-mark-head"), host, epochs=1)
    x, _ = photo_patches("sr2", 32, "train", 320, seed=0)
    pool = natural_images(320, 32, seed=1)
    steps = {"head32": [], "head64": [], "finetune": []}
    for rep in range(args.reps):
        for w in (32, 64):
            head = MarkHead(w, budget_for_psnr(35.3))
            t0 = time.perf_counter()
            train_mark_head(scheme, head, pool, steps=10, batch_size=32, seed=rep)
            steps[f"head{w}"].append((time.perf_counter() - t0) / 10)
        marked = host_for_task("sr2", "unet", width=32, seed=0)
        t0 = time.perf_counter()
        scheme.embed_host(marked, x, batch_size=32, seed=rep)  # 1 epoch of 320 inputs = 10 steps
        steps["finetune"].append((time.perf_counter() - t0) / 10)
    row = {f"{k}_s_per_step": statistics.median(v) for k, v in steps.items()}
    for w in (32, 64):
        row[f"ratio_head{w}_vs_finetune"] = statistics.median(
            h / f for h, f in zip(steps[f"head{w}"], steps["finetune"], strict=True))
    out = torch.cat([heads[32](x[:64]) for _ in range(4)])
    row["verify_ms_per_output"] = per_call(lambda: scheme.p_values(out), 3) / len(out) * 1e3
    result["marking"] = row
    print(f"marking, s/step (batch 32): head w32 {row['head32_s_per_step']:.3f} "
          f"({row['ratio_head32_vs_finetune']:.2f}x fine-tuning), w64 {row['head64_s_per_step']:.3f} "
          f"({row['ratio_head64_vs_finetune']:.2f}x), fine-tuning the host {row['finetune_s_per_step']:.3f}; "
          f"verification {row['verify_ms_per_output']:.2f} ms per 32 px output")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
