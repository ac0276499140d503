"""How often would a thief's anomaly detector in front of the API catch the trigger queries?

    .venv/bin/python experiments/blackbox/detector.py [--m 256] [--noise 0.1]

Two detectors a thief could run, each calibrated on held-out clean images (the test split) at a 1 % / 5 %
false-positive rate: (a) PCA reconstruction error (50 components fitted on the attacker split: the thief's own
data), (b) the leaked model's own max-softmax confidence (low = suspicious; the base model stands in for a copy).
Prints the catch rate on the product's triggers at each rate; results to experiments/results/blackbox/detector.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.decomposition import PCA

torch.set_num_threads(1)

from nnmark import Key  # noqa: E402
from nnmark.blackbox import make_triggers  # noqa: E402
from nnmark.data import load_splits  # noqa: E402
from nnmark.io import load_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, default=256)
    ap.add_argument("--noise", type=float, default=0.1)
    ap.add_argument("--base", default="/tmp/nnmark-blackbox-exp/base.safetensors")
    args = ap.parse_args()
    sp = load_splits("mnist5k")
    trig = make_triggers(Key.from_seed("blackbox-experiment").child("blackbox/triggers"), sp, args.m, args.noise)
    flat = lambda x: x.reshape(len(x), -1).numpy()  # noqa: E731
    pca = PCA(50, random_state=0).fit(flat(sp.attacker.x))

    def rec_err(x: torch.Tensor) -> np.ndarray:
        z = flat(x)
        return ((pca.inverse_transform(pca.transform(z)) - z) ** 2).sum(1)

    base, _ = load_model(args.base)
    with torch.no_grad():
        def msp(x: torch.Tensor) -> np.ndarray:
            return -torch.softmax(base(x), 1).max(1).values.numpy()  # higher = more suspicious

        out = {"m": args.m, "noise": args.noise}
        for name, score in (("pca_reconstruction", rec_err), ("max_softmax", msp)):
            clean, triggers = score(sp.test.x), score(trig.x)
            for fpr in (0.01, 0.05):
                thr = np.quantile(clean, 1 - fpr)
                out[f"{name}@fpr{fpr}"] = float((triggers > thr).mean())
    print(out)
    Path("experiments/results/blackbox").mkdir(parents=True, exist_ok=True)
    Path(f"experiments/results/blackbox/detector_noise{args.noise}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
