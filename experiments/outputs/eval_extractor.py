"""Bit accuracy of a pre-trained extractor on its own encoder's marks, on test-photo patches.

    .venv/bin/python experiments/outputs/eval_extractor.py src/nnmark/outputs/assets/extractor48.safetensors

Marks ``--n`` 32x32 patches of the test photos (never trained on) with the encoder written beside the
extractor (``*.encoder.safetensors``) and random messages, rounds them to 8 bits, and reports the raw
decoder's bit accuracy after no attack, JPEG 50 (Pillow), noise 0.05, a crop keeping 1/4 and a x0.5 resize,
plus the PSNR of the marked patches. Prints one JSON object (and writes it to ``--json`` if given).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("extractor")
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from safetensors import safe_open
    from torchmetrics.functional.image import peak_signal_noise_ratio

    from nnmark.outputs import augment
    from nnmark.outputs.data import natural_images
    from nnmark.outputs.extractor import Extractor, MessageEncoder

    ext = Extractor.load(args.extractor)
    enc_path = Path(args.extractor).with_suffix(".encoder.safetensors")
    with safe_open(str(enc_path), framework="pt") as f:
        info = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}
    enc = MessageEncoder(int(info["bits"]), int(info["width"]), float(info["budget"]))
    enc.load_state_dict(state)
    enc.eval()
    gen = torch.Generator().manual_seed(args.seed)
    x = natural_images(args.n, 32, args.seed, split="test")
    m = torch.randint(0, 2, (args.n, ext.bits), generator=gen).float()
    out: dict[str, float] = {}
    with torch.no_grad():
        y = augment.quantize_uint8(enc(x, m))
        out["psnr"] = float(peak_signal_noise_ratio(y, x, data_range=1.0))
        attacks = {"none": lambda t: t, "jpeg50": lambda t: augment.jpeg_real(t, 50),
                   "noise0.05": lambda t: augment.gaussian_noise(t, 0.05, gen),
                   "crop0.25": lambda t: torch.cat([augment.crop_keep(t[i:i + 1], 0.25, gen) for i in range(len(t))]),
                   "resize0.5": lambda t: augment.resize(t, 0.5)}
        for name, fn in attacks.items():
            z = ext.decoder(fn(y))
            out[name] = float(((z > 0).float() == m).float().mean())
    print(json.dumps(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
