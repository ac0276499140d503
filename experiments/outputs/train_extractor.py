"""Pre-train the message-agnostic extractor that nnmark ships (src/nnmark/outputs/assets/).

    .venv/bin/python experiments/outputs/train_extractor.py --steps 3000 --bits 48 --width 16 \
        --clean-frac 0.3 --ramp-frac 0.8 --out src/nnmark/outputs/assets/extractor48.safetensors

(the command that made the shipped file: 671 s on one loaded core; the defaults, 2,000 steps with a
10% clean start and the ramp over half the steps, made the previous, weaker one).

An encoder/decoder pair learns to hide and read uniformly random 48-bit messages in 32x32
patches of the bundled train photos under the distortions of nnmark.outputs.augment; the
decoder is kept and calibrated (mean and whitening of its logits over other train-photo
patches). Writes the extractor (safetensors), the encoder beside it (``*.encoder.safetensors``)
and the training log as JSON (experiments/results/outputs/extractor_log.json).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--bits", type=int, default=48)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--budget", type=float, default=0.012)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clean-frac", type=float, default=0.1, help="share of steps with no distortion")
    ap.add_argument("--ramp-frac", type=float, default=0.5, help="share of steps after which distortions are at full "
                    "strength and the residual at --budget")
    ap.add_argument("--boost", type=float, default=4.0, help="residual RMS at the start, in units of --budget")
    ap.add_argument("--front", default="rgb", choices=("rgb", "luma2"),
                    help="decoder front end: the image as it is, or its luma averaged over 2x2 pixels")
    ap.add_argument("--size", type=int, default=32, help="side of the training patches the encoder marks")
    ap.add_argument("--window", type=int, default=None,
                    help="the decoder reads one random window of this side per patch (offsets multiples of 8), "
                    "so the code cannot lean on the patch border; e.g. --size 64 --window 32")
    ap.add_argument("--phase", action="store_true", help="the encoder sees the 8 px grid's phase (cos/sin channels)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="src/nnmark/outputs/assets/extractor48.safetensors")
    ap.add_argument("--log", default="experiments/results/outputs/extractor_log.json")
    ap.add_argument("--recalibrate", action="store_true",
                    help="only redo the null calibration of the extractor at --out (no training)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.recalibrate:
        from nnmark.outputs.extractor import Extractor, calibration_images

        ext = Extractor.load(args.out)
        ext.calibrate(calibration_images(8192, 32, args.seed + 1))
        ext.save(args.out)
        print(f"recalibrated {args.out}")
        return
    from safetensors.torch import save_file

    from nnmark.outputs.extractor import pretrain_extractor

    def progress(step: int, stats: dict[str, float]) -> None:
        print(f"step {step}/{args.steps}: loss {stats['loss']:.4f} bit accuracy {stats['bit_acc']:.4f}", flush=True)

    ext, enc, log = pretrain_extractor(args.bits, args.steps, args.seed, width=args.width, budget=args.budget,
                                       lr=args.lr, batch_size=args.batch_size, progress=progress,
                                       clean_frac=args.clean_frac, ramp_frac=args.ramp_frac, boost=args.boost,
                                       front=args.front, size=args.size, window=args.window,
                                       phase=args.phase, log_every=50)
    out = Path(args.out)
    ext.save(out)
    save_file({k: v.contiguous() for k, v in enc.state_dict().items()},
              str(out.with_suffix(".encoder.safetensors")), metadata={"bits": str(args.bits),
                                                                     "width": str(args.width),
                                                                     "budget": str(args.budget),
                                                                     "phase": str(args.phase)})
    Path(args.log).parent.mkdir(parents=True, exist_ok=True)
    Path(args.log).write_text(json.dumps({"args": vars(args), **log}, indent=1))
    print(f"wrote {out} ({out.stat().st_size} bytes) in {log['seconds']:.0f} s")


if __name__ == "__main__":
    main()
