"""Robustness of ``output-wu`` on 128 px outputs (the mean statistic of 16 aligned 32 px tiles), inference only.

    .venv/bin/python experiments/outputs/wu_large_robustness.py --key-task sr2 \
        --out experiments/results/outputs/wu_large_robust_sr2.json
    # the markdown table of a finished run:
    .venv/bin/python experiments/outputs/wu_large_robustness.py \
        --table experiments/results/outputs/wu_large_robust_sr2.json

The key is the committed 32 px key of ``wu_fpr_study.MODELS`` (its E, its secret), read at 128 px through
:meth:`OutputWu.with_read_size` and calibrated exactly as ``wu_fpr_study.py --read-size 128`` does (same kinds,
same seeds: test photos, the key's unmarked host and its second-key host on held-out test inputs, each in the 9
conditions, ``--calibrate`` per kind; the null is pooled over those 3 kinds), or with ``--by-kind`` as
``wu_fpr_study.py --by-kind`` does (every kind of ``wu_fpr_study.negatives`` but the attacker and grey photos and
the third-key host, each kind its own condition). Then, for every attack (real Pillow JPEG 50 / 80, Gaussian noise
0.05 / 0.1, crop keeping 1/2 and 1/4 of the area with the rest zeroed, x0.5 down-up resize; each image attacked on
its own, crop positions and noise drawn per image from ``--seed``, the result quantised to 8 bits as a saved image
would be):

- detection: the share of the marked host's 128 px outputs on held-out test / attacker inputs (never trained on,
  never calibrated on) whose single-image p-value is below alpha 1e-2 and 1e-3; an image that ``verify`` would
  refuse as too noisy counts as not detected (and is counted apart);
- false claims: the same attack on held-out negatives of every kind of ``wu_fpr_study.negatives`` (other seeds
  than the calibration's), the share claimed at the same alpha, per kind and over all, with two-sided 99%
  Clopper-Pearson intervals;
- the same two measurements at 32 px, single tiles: the marked host's 32 px outputs and 32 px negatives under the
  same attacks, read with the committed 32 px key and its committed calibration.

Also recorded per attack: the lowest marked statistic and the highest negative statistic (a descriptive margin,
not a p-value), and the smallest p-value the calibration can give (``1 / (min_g n_g + 1)``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from wu_fpr_study import (  # noqa: E402
    ALPHAS,
    MODELS,
    RESULTS,
    host_outputs,
    inputs,
    interval,
    load_host,
    negatives,
    noisy,
    p_values,
    quantise,
)

from nnmark.outputs.data import natural_images, photo_patches  # noqa: E402
from nnmark.outputs.wu_scheme import OutputWu, distort_one  # noqa: E402

ATTACKS: tuple[tuple[str, float] | None, ...] = (
    None, ("jpeg", 50), ("jpeg", 80), ("noise", 0.05), ("noise", 0.1), ("crop", 0.5), ("crop", 0.25),
    ("resize", 0.5))


def attack_name(a: tuple[str, float] | None) -> str:
    if a is None:
        return "none"
    kind, v = a
    return {"jpeg": f"JPEG {int(v)}", "noise": f"noise {v:g}", "crop": f"crop keep 1/{round(1 / v)}",
            "resize": f"resize x{v:g}"}[kind]


def attacked(images: torch.Tensor, a: tuple[str, float] | None, seed: int) -> torch.Tensor:
    """Every image under attack ``a`` on its own (its own crop position / noise draw), quantised to 8 bits."""
    if a is None:
        return images
    gen = torch.Generator().manual_seed(seed)
    return quantise(torch.cat([distort_one(img[None], a, gen) for img in images]))


def calibrate_128(scheme32: OutputWu, task: str, kind: str, folder: Path, size: int, n: int) -> tuple[OutputWu, dict]:
    """The ``wu_fpr_study.py --read-size`` calibration (same kinds and seeds), pooled over the 3 kinds."""
    scheme = scheme32.with_read_size(size)
    kinds = {"natural": natural_images(n, size, 303, "test")}
    xa = photo_patches(task, size, "test", n, 101)[0]
    for label, f in (("unmarked host", "unmarked_host"), ("other-key host", "other_key_host")):
        if (folder / f"{f}.safetensors").exists():
            kinds[label] = host_outputs(load_host(task, kind, folder / f"{f}.safetensors"), xa)
    t = time.perf_counter()
    scheme.calibrate(negatives=kinds)
    return scheme, {"kinds": {k: len(v) for k, v in kinds.items()},
                    "conditions": {k: len(v) for k, v in scheme.null_by_condition().items()},
                    "seconds": time.perf_counter() - t,
                    "threshold": {f"{a:g}": scheme.threshold(a) for a in ALPHAS},
                    "smallest_p": scheme.min_alpha(1)}


def calibrate_by_kind(scheme32: OutputWu, task: str, size: int, n: int, cache: Path | None) -> tuple[OutputWu, dict]:
    """``wu_fpr_study.py --by-kind --read-size`` 's calibration: ``n`` negatives of every kind of
    ``wu_fpr_study.negatives`` (seed 303) except the attacker and grey photos and the third-key host, each kind
    its own condition in each of the 9 distortions."""
    scheme = scheme32.with_read_size(size)
    kinds = {k: v for k, v in negatives(task, size, n, n, 303, cache, third=False).items()
             if k not in ("natural: attacker photo", "natural: other bundled grey photos")}
    t = time.perf_counter()
    scheme.calibrate(negatives=kinds, by_kind=True)
    return scheme, {"kinds": {k: len(v) for k, v in kinds.items()}, "by_kind": True,
                    "conditions": {k: len(v) for k, v in scheme.null_by_condition().items()},
                    "seconds": time.perf_counter() - t,
                    "threshold": {f"{a:g}": scheme.threshold(a) for a in ALPHAS},
                    "smallest_p": scheme.min_alpha(1)}


def measure(scheme: OutputWu, marked: torch.Tensor, neg: dict[str, torch.Tensor], seed: int) -> dict:
    """Detection of ``marked`` and claims on ``neg`` under every attack of :data:`ATTACKS`."""
    out = {}
    for j, a in enumerate(ATTACKS):
        t = time.perf_counter()
        name = attack_name(a)
        m = attacked(marked, a, seed + 1000 * j)
        st = scheme.statistics(m)
        ref = noisy(scheme, m)
        pm = p_values(scheme, st)
        det = {"n": len(pm), "refused_as_noisy": int(ref.sum()), "statistic_mean": float(st.mean()),
               "statistic_min": float(st.min()), "statistic_p05": float(np.quantile(st.numpy(), 0.05))}
        half = len(pm) - len(pm) // 2  # inputs(): the test photos first, then the attacker photo
        for al in ALPHAS:
            hit = (pm < al) & ~ref
            k = int(hit.sum())
            det[f"{al:g}"] = {"detected": k, "rate": k / len(pm), "ci99": interval(k, len(pm)),
                              "rate_test_photos": float(hit[:half].mean()),
                              "rate_attacker_photo": float(hit[half:].mean())}
        rows, all_p, all_ref, neg_max = {}, [], [], -np.inf
        for i, (kname, imgs) in enumerate(neg.items()):
            x = attacked(imgs, a, seed + 1000 * j + 17 + i)
            sn = scheme.statistics(x)
            rn = noisy(scheme, x)
            pn = p_values(scheme, sn)
            r = {"n": len(pn), "refused_as_noisy": int(rn.sum()), "statistic_mean": float(sn.mean()),
                 "statistic_max": float(sn.max())}
            for al in ALPHAS:
                k = int(((pn < al) & ~rn).sum())
                r[f"{al:g}"] = {"claims": k, "fpr": k / len(pn), "ci99": interval(k, len(pn))}
            rows[kname] = r
            all_p.append(pn)
            all_ref.append(rn)
            neg_max = max(neg_max, float(sn.max()))
        p, rf = np.concatenate(all_p), np.concatenate(all_ref)
        tot = {"n": int(len(p)), "refused_as_noisy": int(rf.sum()), "statistic_max": neg_max}
        for al in ALPHAS:
            k = int(((p < al) & ~rf).sum())
            tot[f"{al:g}"] = {"claims": k, "fpr": k / len(p), "ci99": interval(k, len(p))}
        out[name] = {"detection": det, "negatives": rows, "all_negatives": tot,
                     "margin_min_marked_minus_max_negative": det["statistic_min"] - neg_max,
                     "seconds": time.perf_counter() - t}
        print(name, {al: (det[al]["detected"], tot[al]["claims"]) for al in ("0.01", "0.001")},
              f"marked min {det['statistic_min']:.3f}, negatives max {neg_max:.3f}, "
              f"{out[name]['seconds']:.0f} s", flush=True)
    return out


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def table(d: dict) -> str:
    big, small = d["read_size"], 32
    how = "by kind" if d["calibration"].get("by_kind") else "pooled over"
    lines = [f"Key `{d['key_task']}` ({d['key_id']}); {big} px: mean of {(big // small) ** 2} tiles, null {how} "
             f"{len(d['calibration']['kinds'])} kinds x 9 conditions, {min(d['calibration']['conditions'].values())} "
             f"per condition, thresholds {d['calibration']['threshold']['0.01']:.3f} / "
             f"{d['calibration']['threshold']['0.001']:.3f}"
             + (f"; {small} px: one tile, the committed calibration (thresholds {d['small']['threshold']['0.01']:.3f}"
                f" / {d['small']['threshold']['0.001']:.3f})." if "small" in d else "; 32 px not run."), "",
             f"| attack | {big} px detected 1e-2 / 1e-3 | {big} px negatives claimed 1e-2 / 1e-3 [99% CI at 1e-2] | "
             f"{big} px min marked / max negative | {small} px detected 1e-2 / 1e-3 | {small} px claimed 1e-2 / 1e-3 |",
             "|---|---|---|---|---|---|"]
    for name, r in d["large"]["attacks"].items():
        if "small" not in d:
            s = {"detection": {"0.01": {"rate": float("nan")}, "0.001": {"rate": float("nan")}, "refused_as_noisy": 0},
                 "all_negatives": {"0.01": {"claims": "-"}, "0.001": {"claims": "-"}, "n": "-"}}
        else:
            s = d["small"]["attacks"][name]
        det, neg = r["detection"], r["all_negatives"]
        lines.append(
            f"| {name} | {pct(det['0.01']['rate'])} / {pct(det['0.001']['rate'])}"
            + (f" ({det['refused_as_noisy']} refused)" if det["refused_as_noisy"] else "")
            + f" | {neg['0.01']['claims']} / {neg['0.001']['claims']} of {neg['n']} "
            f"[{100 * neg['0.01']['ci99'][0]:.2f}, {100 * neg['0.01']['ci99'][1]:.2f}]%"
            + (f" ({neg['refused_as_noisy']} refused)" if neg["refused_as_noisy"] else "")
            + f" | {det['statistic_min']:.3f} / {neg['statistic_max']:.3f} | "
            f"{pct(s['detection']['0.01']['rate'])} / {pct(s['detection']['0.001']['rate'])}"
            + (f" ({s['detection']['refused_as_noisy']} refused)" if s["detection"]["refused_as_noisy"] else "")
            + f" | {s['all_negatives']['0.01']['claims']} / {s['all_negatives']['0.001']['claims']} of "
            f"{s['all_negatives']['n']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--table", default=None, help="only print the markdown table of this result JSON")
    ap.add_argument("--key-task", default="sr2", choices=tuple(MODELS))
    ap.add_argument("--read-size", type=int, default=128)
    ap.add_argument("--calibrate", type=int, default=500, help="128 px calibration negatives per kind (3 kinds)")
    ap.add_argument("--per-kind", type=int, default=150, help="held-out negatives per kind, large images")
    ap.add_argument("--per-kind-small", type=int, default=400, help="held-out negatives per kind, 32 px")
    ap.add_argument("--marked", type=int, default=400, help="marked outputs, large and 32 px each")
    ap.add_argument("--message-cache", default=None, help="mark_hosts.py cache with output-message marked hosts")
    ap.add_argument("--seed", type=int, default=12800)
    ap.add_argument("--by-kind", action="store_true", help="calibrate the large null by kind (calibrate_by_kind)")
    ap.add_argument("--skip-small", action="store_true", help="do not measure single 32 px tiles")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return
    torch.set_num_threads(1)
    from nnmark.schemes.base import load_scheme

    t0 = time.perf_counter()
    name, kind = MODELS[args.key_task]
    folder = RESULTS / name
    scheme32 = load_scheme(folder / "owner_key.json", expect="output-wu", log=folder / "commitments.log")
    marked_host = load_host(args.key_task, kind, folder / "marked_host.safetensors")
    cache = Path(args.message_cache) if args.message_cache else None
    res: dict = {"command_args": vars(args), "key_task": args.key_task, "key_id": scheme32.key.key_id,
                 "key_folder": str(folder.relative_to(RESULTS.parents[2])), "read_size": args.read_size,
                 "attack_seed": args.seed}
    if args.by_kind:
        scheme, cal = calibrate_by_kind(scheme32, args.key_task, args.read_size, args.calibrate, cache)
    else:
        scheme, cal = calibrate_128(scheme32, args.key_task, kind, folder, args.read_size, args.calibrate)
    res["calibration"] = cal
    print("calibrated", cal, flush=True)
    runs = [(args.read_size, scheme, args.per_kind, "large")]
    if not args.skip_small:
        runs.append((scheme32.image_size, scheme32, args.per_kind_small, "small"))
    for size, sch, n_neg, label in runs:
        t = time.perf_counter()
        marked = host_outputs(marked_host, inputs(args.key_task, size, args.marked, 7001))
        # held-out negatives: wu_fpr_study's kinds at another seed than its calibration (303) and study (9001)
        neg = negatives(args.key_task, size, n_neg, n_neg, 9101, cache)
        print(f"{label}: {len(marked)} marked, {sum(len(v) for v in neg.values())} negatives of {len(neg)} kinds "
              f"({time.perf_counter() - t:.0f} s)", flush=True)
        res[label] = {"read_size": size, "threshold": {f"{a:g}": sch.threshold(a) for a in ALPHAS},
                      "smallest_p": sch.min_alpha(1),
                      "calibration_per_condition_min": min(len(v) for v in sch.null_by_condition().values()),
                      "attacks": measure(sch, marked, neg, args.seed)}
    res["seconds"] = time.perf_counter() - t0
    res["note"] = ("conformal p-values: the smallest reachable is 1/(n_min+1) with n_min the smallest calibration "
                   "condition; the margin (lowest marked minus highest negative statistic) is descriptive only")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))
    print(table(res))
    print(f"done in {res['seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
