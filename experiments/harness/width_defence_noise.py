"""The width defence against ``split`` followed by small weight noise, and its soundness check, on digits.

Reuses the attack suite's cached hosts (``experiments/attacks/run_attacks.py``: the CNN and the small VGG, 64 bits of
uchida / projection / wang-manu / wang-auto each, 10 epochs; clean hosts of seeds 100-102), built there on first use.

- Marked: each marked host split (8 units a layer) and then perturbed -- every parameter plus Gaussian noise of
  sigma times its tensor's mean |value|, sigma in {1e-3, 3e-3, 1e-2}, 3 seeds -- verified with the defence on.
- Null: each clean host (3 seeds) made wide by the suite's five width-changing obfuscations (split, dummy-cancel,
  dummy-zero, merge, the fold+split+dummy+permute-rescale chain: the earlier 0/120 check) and by split + noise
  (sigma 1e-3 and 1e-2), verified with the defence on against every marked key: a claim there is a false alarm.

    .venv/bin/python experiments/harness/width_defence_noise.py [HOST ...]   # default: cnn vgg-small
    # -> experiments/results/harness/width_defence.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments" / "attacks"))

import run_attacks as suite  # noqa: E402

from nnmark.attacks import build_attack  # noqa: E402
from nnmark.train import accuracy  # noqa: E402

SIGMAS = (1e-3, 3e-3, 1e-2)
NULL_SIGMAS = (1e-3, 1e-2)
OUT = ROOT / "experiments" / "results" / "harness" / "width_defence.json"


def perturbed(model: torch.nn.Module, sigma: float, seed: int) -> torch.nn.Module:
    """Every parameter plus N(0, (sigma * mean |tensor|)^2) noise, in place."""
    gen = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(sigma * p.abs().mean() * torch.randn(p.shape, generator=gen))
    return model


def main() -> None:
    torch.set_num_threads(1)
    hosts = sys.argv[1:] or suite.HOSTS
    d = suite.splits()
    marked_rows, null_rows = [], []
    t0 = time.time()
    for host in hosts:
        cleans = {s: suite.clean(host, 100 + s) for s in range(3)}
        for name in suite.WHITE:
            scheme, model = suite.marked(name, host)
            acc = accuracy(model, d.test)
            base = suite.verdict(scheme, model, True)
            for sigma in SIGMAS:
                for seed in range(3):
                    out = perturbed(build_attack("split", units=8, seed=seed).attack(model), sigma, seed)
                    marked_rows.append({"host": host, "scheme": name, "sigma": sigma, "seed": seed,
                                        "accuracy_lost_points": 100 * (acc - accuracy(out, d.test)),
                                        "p_marked": base["p"], **suite.verdict(scheme, out, True)})
            for seed, clean in cleans.items():
                for label, attack, params in suite.OBFUSCATIONS[4:]:
                    out = build_attack(attack, seed=seed, **params).attack(clean, d.attacker)
                    null_rows.append({"host": host, "scheme": name, "seed": 100 + seed, "suspect": label,
                                      **suite.verdict(scheme, out, True)})
                for sigma in NULL_SIGMAS:
                    out = perturbed(build_attack("split", units=8, seed=seed).attack(clean), sigma, seed)
                    null_rows.append({"host": host, "scheme": name, "seed": 100 + seed,
                                      "suspect": f"split+noise {sigma:g}", **suite.verdict(scheme, out, True)})
            print(f"{host} {name}: {time.time() - t0:.0f} s", flush=True)
    summary = {
        "marked": {f"{sigma:g}": {"copies": sum(r["sigma"] == sigma for r in marked_rows),
                                  "owned": sum(r["sigma"] == sigma and r["owned"] for r in marked_rows),
                                  "restored": sum(r["sigma"] == sigma and r.get("widths") == "restored"
                                                  for r in marked_rows),
                                  "max_accuracy_lost_points": max(r["accuracy_lost_points"] for r in marked_rows
                                                                  if r["sigma"] == sigma)}
                   for sigma in SIGMAS},
        "null": {"verdicts": sum(r["p"] is not None for r in null_rows), "suspects": len(null_rows),
                 "owned": sum(bool(r["owned"]) for r in null_rows),
                 "smallest_p": min(r["p"] for r in null_rows if r["p"] is not None),
                 "by_suspect": {s: {"verdicts": sum(r["suspect"] == s and r["p"] is not None for r in null_rows),
                                    "owned": sum(r["suspect"] == s and bool(r["owned"]) for r in null_rows)}
                                for s in dict.fromkeys(r["suspect"] for r in null_rows)}},
        "hosts": list(hosts), "seconds": time.time() - t0,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"summary": summary, "marked": marked_rows, "null": null_rows}, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
