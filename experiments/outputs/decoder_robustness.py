"""How robust can a mark read by a given decoder be? Marks optimised per image, after the fact, then attacked.

    .venv/bin/python experiments/outputs/decoder_robustness.py --extractor shipped keyed \\
        --json experiments/results/outputs/decoder_robustness.json

For each decoder (``shipped``, ``keyed`` or an extractor file), ``--n`` test-photo patches (photos never trained
on) are marked by :meth:`OutputMessage.mark_images` (``--steps`` Adam steps on a residual bounded by
``--max-delta`` per pixel, through full-strength training distortions, rounded to 8 bits) for the owner key
``owner-posthoc``; then bit accuracy and the share of batches of 16 with p < 1e-6 after JPEG 50 (Pillow),
noise 0.05, a crop keeping 1/4 and a x0.5 resize. This isolates the decoder: the residual is as free as it can
be, so a decoder that fails here cannot be rescued by any host. (A host is not that free -- see mark_hosts.py.)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--extractor", nargs="+", default=["shipped", "keyed"])
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--max-delta", type=float, default=6 / 255)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from torchmetrics.functional.image import peak_signal_noise_ratio

    from nnmark.keys import Key
    from nnmark.outputs import augment
    from nnmark.outputs.agnostic import OutputMessage
    from nnmark.outputs.data import natural_images

    clean = natural_images(args.n, 32, 11, split="test")
    results: dict[str, dict] = {"args": vars(args), "decoders": {}}
    for name in args.extractor:
        t0 = time.perf_counter()
        scheme = OutputMessage.create(Key.from_seed("owner-posthoc"), None, extractor=name, strength=1.0)
        marked = torch.cat([scheme.mark_images(clean[i:i + 16], steps=args.steps, max_delta=args.max_delta, seed=i)
                            for i in range(0, args.n, 16)])
        gen = torch.Generator().manual_seed(5)
        attacks = {"none": lambda t: t, "jpeg50": lambda t: augment.jpeg_real(t, 50),
                   "noise0.05": lambda t, g=gen: augment.gaussian_noise(t, 0.05, g),
                   "crop0.25": lambda t, g=gen: torch.cat([augment.crop_keep(t[i:i + 1], 0.25, g)
                                                          for i in range(len(t))]),
                   "resize0.5": lambda t: augment.resize(t, 0.5)}
        row: dict[str, object] = {
            "psnr": float(peak_signal_noise_ratio(marked, clean, data_range=1.0, reduction="none",
                                                  dim=(1, 2, 3)).mean())}
        for attack, fn in attacks.items():
            img = fn(marked)
            single, batch = scheme.p_values(img, 1), scheme.p_values(img, 16)
            row[attack] = {"bit_acc": float(scheme.matches(img).mean() / scheme.bits),
                           "single_frac_p_lt_1e-6": float((single < 1e-6).mean()),
                           "batch16_frac_p_lt_1e-6": float((batch < 1e-6).mean()),
                           "batch16_median_p": float(np.median(batch))}
        row["seconds"] = time.perf_counter() - t0
        results["decoders"][name] = row
        print(name, json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
