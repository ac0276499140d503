"""A thief who holds the public shipped decoder (but not the key) tries to wash the mark out of outputs.

    .venv/bin/python experiments/outputs/thief_public_decoder.py --cache /tmp/nnmark-outputs

The owner's key keeps the message and the rotation secret, but the decoder and its calibration ship with
nnmark. The thief pushes the calibrated read-out ``W (decoder(x) - mu)`` of each marked output towards zero
(the centre of unmarked images) by signed-gradient steps inside an L-infinity ball of radius ``eps``, then
the owner verifies. Marked host: colourise U-Net from mark_hosts.py (key ``owner-colourise``), 256 test
outputs. Writes experiments/results/outputs/thief_public_decoder.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from torchmetrics.functional.image import peak_signal_noise_ratio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", default="/tmp/nnmark-outputs")
    ap.add_argument("--task", default="colourise")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", default="experiments/results/outputs/thief_public_decoder.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from nnmark.keys import Key
    from nnmark.outputs import augment
    from nnmark.outputs.agnostic import OutputMessage
    from nnmark.outputs.data import photo_patches
    from nnmark.outputs.hosts import host_for_task

    kind = {"sr2": "unet", "colourise": "unet", "denoise": "resnet"}[args.task]
    host = host_for_task(args.task, kind)
    host.load_state_dict(torch.load(Path(args.cache) / f"{args.task}-{kind}-marked.pt", weights_only=True))
    host.eval()
    scheme = OutputMessage.create(Key.from_seed(f"owner-{args.task}"), None)
    xt, _ = photo_patches(args.task, 32, "test", 256, seed=1)
    with torch.no_grad():
        marked = augment.quantize_uint8(host(xt).clamp(0, 1))
    ext = scheme.extractor
    result = {"task": args.task, "steps": args.steps, "n": len(marked), "eps": {}}
    for eps in (0.0, 1 / 255, 2 / 255, 4 / 255, 8 / 255):
        delta = torch.zeros_like(marked, requires_grad=True)
        for _ in range(args.steps if eps > 0 else 0):
            loss = ext((marked + delta).clamp(0, 1)).pow(2).sum()
            (g,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                delta -= (eps / 8) * g.sign()
                delta.clamp_(-eps, eps)
        with torch.no_grad():
            washed = augment.quantize_uint8((marked + delta).clamp(0, 1))
            r, _ = scheme.image_readouts(washed)
            acc = float(((r > 0).long().numpy() == scheme.message[None]).mean())
            single = scheme.p_values(washed, 1)
            batch = scheme.p_values(washed, 16)
            psnr = float(peak_signal_noise_ratio(washed, marked, data_range=1.0)) if eps > 0 else float("inf")
        row = {"psnr_vs_marked": psnr, "bit_acc": acc, "single_frac_p_lt_1e-6": float((single < 1e-6).mean()),
               "batch16_frac_p_lt_1e-6": float((batch < 1e-6).mean()), "batch16_max_p": float(np.max(batch))}
        result["eps"][f"{eps * 255:.0f}/255"] = row
        print(f"eps {eps * 255:.0f}/255: {row}", flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
