"""Single-image detection at alpha 1e-2 of the shipped sr2 marked host's outputs under a thief's distortions, read
with the shipped output-wu key and, with ``--compare FOLDER``, with another key folder of the same key (e.g. its
earlier pooled calibration, ``git show <rev>:<path>`` into a folder). Inference only: 500 held-out test patches
(seed 4343), 8-bit quantised; ``verify 16`` counts the owned verdicts of 10 batches of 16.

    .venv/bin/python experiments/outputs/wu_shipped_key_check.py --compare /tmp/old_key \
        --out experiments/results/outputs/wu_sr2_shipped_key_check.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from nnmark.outputs import augment
from nnmark.outputs.data import photo_patches
from nnmark.outputs.hosts import host_for_task
from nnmark.schemes.base import load_scheme

SHIPPED = Path(__file__).resolve().parents[2] / "experiments" / "results" / "outputs" / "wu_sr2_binary_model"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compare", default=None, help="folder with owner_key.json(.commit.json), commitments.log")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    folders = {"shipped": SHIPPED, **({"compare": Path(args.compare)} if args.compare else {})}
    keys = {k: load_scheme(f / "owner_key.json", expect="output-wu", log=f / "commitments.log")
            for k, f in folders.items()}
    host = host_for_task("sr2", "unet", 16)
    host.load_state_dict(load_file(str(SHIPPED / "marked_host.safetensors")))
    x, _ = photo_patches("sr2", 32, "test", args.n, 4343)
    with torch.no_grad():
        out = (host.eval()(x).clamp(0, 1) * 255).round() / 255
    g = torch.Generator().manual_seed(6)
    attacked = {"clean": out, "crop keep 1/2": augment.crop_keep(out, 0.5, g),
                "noise 0.05": augment.gaussian_noise(out, 0.05, g), "noise 0.1": augment.gaussian_noise(out, 0.1, g),
                "JPEG 70": augment.jpeg_real(out, 70), "JPEG 50": augment.jpeg_real(out, 50)}
    res: dict = {"n": args.n, "alpha": 0.01}
    for name, s in keys.items():
        thr = s.threshold(0.01)
        row: dict = {"folder": str(folders[name]), "conditions": len(s.null_conditions), "threshold": thr}
        for label, imgs in attacked.items():
            st = s.statistics(imgs)
            row[label] = {"detected": float((st >= thr).double().mean()), "median_statistic": float(st.median()),
                          "verify_16_owned_of_10": sum(s.verify(imgs[i:i + 16], alpha=0.01).owned
                                                       for i in range(0, 160, 16))}
        res[name] = row
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
