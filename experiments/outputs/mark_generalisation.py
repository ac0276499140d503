"""Where a marked host's single-output bit accuracy is lost: on the photos it was marked on, on other
positions of those photos, or on photos never seen.

    .venv/bin/python experiments/outputs/mark_generalisation.py --task sr2                    # as before
    .venv/bin/python experiments/outputs/mark_generalisation.py --task sr2 --vary 1.0 --epochs 24
    .venv/bin/python experiments/outputs/mark_generalisation.py --task sr2 --jitter           # offline copies
    .venv/bin/python experiments/outputs/mark_generalisation.py --task sr2 --vary 1.0 --extra-grey 1024

Trains the task's host (3 epochs on 1,024 train patches, cached under ``--cache``), fine-tunes a copy
against the shipped extractor (``--epochs``, ``--fidelity``, ``--strength``, ``--vary`` =
``input_variation``), then on 256 patches each of the train photos (``train``), other positions of the same
photos (``val``), the test photos and the attacker photo reports bit accuracy, the share of single outputs
at p < 1e-6, PSNR marked vs unmarked, the six worst bits' accuracy, and the keyed read-out signed towards
the message: of the unmarked outputs (their bias), of the ground truth, and the mark's shift (marked minus
unmarked), with their spreads. ``--jitter`` instead adds one colour-jittered, rotated copy of every training
target (gain per channel 0.6..1.4, gamma exp(0.5 z), rotation by k x 90 deg) to the marking set.
Writes ``<out>/<task>_<tag>.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torchmetrics.functional.image import peak_signal_noise_ratio

HOSTS = {"sr2": "unet", "colourise": "unet", "denoise": "resnet"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="colourise", choices=tuple(HOSTS))
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--fidelity", type=float, default=0.05)
    ap.add_argument("--strength", type=float, default=0.5)
    ap.add_argument("--vary", type=float, default=0.0, help="input_variation while marking")
    ap.add_argument("--jitter", action="store_true", help="add colour-jittered, rotated copies of the targets")
    ap.add_argument("--width", type=int, default=16, help="host base channels")
    ap.add_argument("--extra-grey", type=int, default=0,
                    help="add this many patches of the grey scikit-image photos no split uses (textures, "
                         "camera, moon, ...), tinted by a random gain per channel, to the marking set")
    ap.add_argument("--tag", default="base")
    ap.add_argument("--cache", default="/tmp/nnmark-generalisation")
    ap.add_argument("--out", default="experiments/results/outputs/generalisation")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from nnmark.keys import Key
    from nnmark.outputs.agnostic import OutputMessage
    from nnmark.outputs.data import degrade, photo_patches, tinted_grey_patches
    from nnmark.outputs.hosts import host_for_task, train_host

    kind = HOSTS[args.task]
    Path(args.cache).mkdir(parents=True, exist_ok=True)
    host_file = Path(args.cache) / (f"{args.task}.pt" if args.width == 16 else f"{args.task}-w{args.width}.pt")
    host = host_for_task(args.task, kind, args.width, seed=0)
    if host_file.exists():
        host.load_state_dict(torch.load(host_file, weights_only=True))
    else:
        stats = train_host(host, args.task, 3, seed=0, data=photo_patches(args.task, 32, "train", 1024, seed=0))
        torch.save(host.state_dict(), host_file)
        print(f"host: {stats['seconds']:.0f} s, test PSNR {stats['test_psnr']:.2f}", flush=True)
    host.eval()
    x, y = photo_patches(args.task, 32, "train", args.n, seed=0)
    if args.jitter:
        g = torch.Generator().manual_seed(11)
        gain = 0.6 + 0.8 * torch.rand(len(y), 3, 1, 1, generator=g)
        gamma = torch.exp(0.5 * torch.randn(len(y), 1, 1, 1, generator=g))
        yj = (y.clamp(1e-4, 1) ** gamma * gain).clamp(0, 1)
        turns = torch.randint(0, 4, (len(y),), generator=g)
        yj = torch.stack([torch.rot90(im, int(k), (1, 2)) for im, k in zip(yj, turns, strict=True)])
        x = torch.cat([x, degrade(args.task, yj, 5)])
    if args.extra_grey:
        x = torch.cat([x, degrade(args.task, tinted_grey_patches(args.extra_grey, 32, 17), 6)])
    key = Key.from_seed(f"owner-{args.task}")
    scheme = OutputMessage.create(key, host, epochs=args.epochs, fidelity=args.fidelity, strength=args.strength,
                                  input_variation=args.vary)
    marked = host_for_task(args.task, kind, args.width)
    marked.load_state_dict(host.state_dict())
    t0 = time.perf_counter()
    scheme.embed_host(marked, x, reference=host, progress=lambda e, s: print(f"  epoch {e}: {s}", flush=True))
    result = {"args": vars(args), "mark_seconds": time.perf_counter() - t0, "splits": {}}
    marked.eval()
    toward = torch.from_numpy(2 * scheme.message - 1).float()
    for split in ("train", "val", "test", "attacker"):
        xs, ys = photo_patches(args.task, 32, split, 256, seed=1)
        with torch.no_grad():
            clean, out = host(xs).clamp(0, 1), marked(xs).clamp(0, 1)
        r1 = scheme.image_readouts(out)[0] * toward
        r0 = scheme.image_readouts(clean)[0] * toward
        rt = scheme.image_readouts(ys)[0] * toward
        right = (r1 > 0).float()
        psnr = peak_signal_noise_ratio(out, clean, data_range=1.0, reduction="none", dim=(1, 2, 3)).numpy()
        p = scheme.p_values(out)
        result["splits"][split] = {
            "bit_acc": float(right.mean()), "single_p_lt_1e-6": float((p < 1e-6).mean()),
            "psnr": float(psnr.mean()), "psnr_min": float(psnr.min()),
            "worst_bits": np.sort(right.mean(0).numpy())[:6].round(3).tolist(),
            "unmarked_signed_mean": float(r0.mean()), "unmarked_per_bit_bias_sd": float(r0.mean(0).std()),
            "unmarked_sd_over_images": float(r0.std(0).mean()), "truth_signed_mean": float(rt.mean()),
            "mark_shift_mean": float((r1 - r0).mean()), "mark_shift_sd_over_images": float((r1 - r0).std(0).mean())}
        print(split, result["splits"][split], flush=True)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{args.task}_{args.tag}.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {out_dir / f'{args.task}_{args.tag}.json'}")


if __name__ == "__main__":
    main()
