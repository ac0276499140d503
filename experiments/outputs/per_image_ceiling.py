"""How well can *any* 32 px image be made to decode to the message at a given PSNR? A ceiling for hosts.

    .venv/bin/python experiments/outputs/per_image_ceiling.py --psnr 35 38 42 46 \
        --host <a colourise-unet-unmarked.pt from mark_hosts.py>

For 256 test-photo patches (natural) and the outputs of a colourise host on them (``--host``, optional), a
residual of fixed RMS per image, ``10 ** (-psnr / 20)`` (so every image sits at exactly that PSNR before 8-bit
rounding), is optimised by Adam for ``--steps`` steps so that the keyed read-out of the shipped decoder decodes
to the owner's message (BCE, no distortions). A host fine-tuned to the same decoder writes one residual per
input through shared weights, at a mean PSNR, so what it reaches on unseen photos is bounded by what a free
per-image residual reaches -- up to how well Adam finds that residual (the figures are reached, not proven
maxima). Reports bit accuracy and the share of single images at p < 1e-6 per PSNR.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--psnr", type=float, nargs="+", default=[35.0, 38.0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--host", default="", help="a colourise U-Net state dict (.pt) whose outputs are marked too")
    ap.add_argument("--out", default="experiments/results/outputs/round5/per_image_ceiling.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from nnmark.keys import Key
    from nnmark.outputs import augment
    from nnmark.outputs.agnostic import OutputMessage
    from nnmark.outputs.data import natural_images, photo_patches
    from nnmark.outputs.hosts import host_for_task

    scheme = OutputMessage.create(Key.from_seed("owner-colourise"), None, strength=0.0)
    sets = {"test photos": natural_images(args.n, 32, seed=1)}
    if args.host:
        host = host_for_task("colourise", "unet")
        host.load_state_dict(torch.load(args.host, weights_only=True))
        host.eval()
        with torch.no_grad():
            sets["colourise outputs"] = host(photo_patches("colourise", 32, "test", args.n, seed=1)[0]).clamp(0, 1)
    target = torch.from_numpy(scheme.message).float()
    result = {"args": vars(args), "rows": []}
    for name, images in sets.items():
        for psnr in args.psnr:
            rms = 10.0 ** (-psnr / 20.0)
            v = torch.randn(images.shape, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
            opt = torch.optim.Adam([v], lr=0.05)

            def marked(v: torch.Tensor = v, rms: float = rms, images: torch.Tensor = images) -> torch.Tensor:
                flat = v.flatten(1)
                scale = rms / flat.pow(2).mean(1).sqrt().clamp_min(1e-12)
                return images + v * scale.view(-1, 1, 1, 1)

            for _ in range(args.steps):
                r = scheme.readout(augment.quantize_uint8(marked()))
                loss = F.binary_cross_entropy_with_logits(r, target.expand_as(r))
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                out = (marked().clamp(0, 1) * 255).round() / 255
                real = 10 * torch.log10(1 / ((out - images) ** 2).flatten(1).mean(1))
                r, _ = scheme.image_readouts(out)
                acc = ((r > 0).long().numpy() == scheme.message[None]).mean(1)
                p = scheme.p_values(out)
            row = {"images": name, "psnr_target": psnr, "psnr_after_rounding": float(real.mean()),
                   "bit_acc": float(acc.mean()), "frac_bit_acc_ge_0.98": float((acc >= 0.98).mean()),
                   "single_p_lt_1e-6": float((p < 1e-6).mean()),
                   "worst_bits": np.sort(((r > 0).long().numpy() == scheme.message[None]).mean(0))[:4].tolist()}
            result["rows"].append(row)
            print(row, flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
