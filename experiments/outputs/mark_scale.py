"""How a marked host's mark strength moves when its weights are moved along the line to the unmarked host.

    .venv/bin/python experiments/outputs/mark_scale.py --cache /tmp/r11/a --task colourise --width 32 \
        --out experiments/results/outputs/round6/scale_colourise.json

For ``lam`` in a grid the host ``w0 + lam * (w1 - w0)`` (``w0`` unmarked, ``w1`` marked by mark_hosts.py) is
evaluated on 256 val patches (train photos, positions never marked on: what an owner may look at) and 256
test-photo patches (photos never trained on): PSNR of its outputs against the unmarked host's, bit accuracy
and the share of single outputs at p < 1e-6. ``lam`` < 1 weakens the mark, ``lam`` > 1 extrapolates it.
Inference only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from mark_hosts import HOSTS, psnr_each


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", required=True, help="folder holding <task>-<kind>[-wW]-{unmarked,marked}.pt")
    ap.add_argument("--task", required=True, choices=tuple(HOSTS))
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--key", default="", help="key seed (default owner-<task>, as mark_hosts.py)")
    ap.add_argument("--lams", type=float, nargs="+", default=[0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.6])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from nnmark.keys import Key
    from nnmark.outputs.agnostic import OutputMessage
    from nnmark.outputs.data import photo_patches
    from nnmark.outputs.hosts import host_for_task

    kind = HOSTS[args.task]
    suffix = "" if args.width == 16 else f"-w{args.width}"
    cache = Path(args.cache)
    w0 = torch.load(cache / f"{args.task}-{kind}{suffix}-unmarked.pt", weights_only=True)
    w1 = torch.load(cache / f"{args.task}-{kind}{suffix}-marked.pt", weights_only=True)
    host = host_for_task(args.task, kind, args.width).eval()
    host.load_state_dict(w0)
    scheme = OutputMessage.create(Key.from_seed(args.key or f"owner-{args.task}"), host)
    splits = {"val": photo_patches(args.task, 32, "val", 256, seed=1)[0],
              "test": photo_patches(args.task, 32, "test", 256, seed=1)[0]}
    with torch.no_grad():
        clean = {k: host(x).clamp(0, 1) for k, x in splits.items()}
    rows = []
    for lam in args.lams:
        host.load_state_dict({k: w0[k] + lam * (w1[k] - w0[k]) if w0[k].is_floating_point() else w1[k]
                              for k in w0})
        row = {"lam": lam}
        for name, x in splits.items():
            with torch.no_grad():
                out = (host(x).clamp(0, 1) * 255).round() / 255
            r, _ = scheme.image_readouts(out)
            acc = float(((r > 0).long().numpy() == scheme.message[None]).mean())
            p = scheme.p_values(out, 1)
            row[name] = {"psnr": float(psnr_each(out, clean[name]).mean()),
                         "psnr_min": float(psnr_each(out, clean[name]).min()),
                         "bit_acc": acc, "single_frac_p_lt_1e-6": float((p < 1e-6).mean())}
        rows.append(row)
        print(f"lam {lam:.2f}: " + "  ".join(f"{k} {v['psnr']:.2f} dB acc {v['bit_acc']:.3f} "
                                             f"p<1e-6 {v['single_frac_p_lt_1e-6']:.2f}"
                                             for k, v in row.items() if k != "lam"), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
