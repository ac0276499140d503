"""What SSIM does an attacker that learns nothing score on mnist5k? (the floor the defended SSIMs sit on)

Scores, against the first 500 owners' training images, images that carry no information about them: the public
mean image, a blank image, uniform noise, and the mean image after a sigmoid attacker's typical failure (all
outputs pushed to 0.5); under skimage's default SSIM (uniform 7x7 window) and Wang et al.'s Gaussian window.

    python experiments/split/ssim_floor.py > experiments/results/split/ssim_floor.json
"""

from __future__ import annotations

import json

import torch

from nnmark.data import load_splits
from nnmark.split.metrics import mse, ssim


def main() -> None:
    s = load_splits("mnist5k")
    x = s.train.x[:500]
    g = torch.Generator().manual_seed(0)
    mean = s.attacker.x.mean(0, keepdim=True).expand_as(x)
    cands = {"public mean image": mean, "blank (all 0)": torch.zeros_like(x), "grey (all 0.5)": torch.full_like(x, 0.5),
             "uniform noise": torch.rand(x.shape, generator=g),
             "mean image, contrast halved": 0.5 * mean + 0.25,
             "another digit (shuffled targets)": x[torch.randperm(500, generator=g)]}
    out = {name: {"mse": mse(x, r), "ssim": ssim(x, r), "ssim_gaussian": ssim(x, r, gaussian=True)}
           for name, r in cands.items()}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
