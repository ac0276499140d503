"""Function-preserving transforms against the white-box marks and the fingerprint tracer (issue 8, part 3).

Host: the Zhang CNN on mnist5k (3,000 training images), 512 bits in conv4 (filter mean, 576 values) for
uchida, projection, wang-manu and wang-auto, 10 epochs (as ``experiments/wang``). The thief permutes every
hidden layer at random and rescales every hidden unit across its ReLU by a log-uniform factor in
[0.01, 100] (``permute-rescale``, :mod:`nnmark.attacks.obfuscate`); verification with the alignment off
and on (:mod:`nnmark.alignment`). The null: clean CNNs of 20 other seeds, verified with alignment on
against every marked model (several keys). The tracer: an AG(2,7) product on a clean base, averages of
2-5 copies permuted and rescaled.

One part a run (one core each; models and keys are cached in ``runs/obfuscation/``, git-ignored)::

    .venv/bin/python experiments/obfuscation/run_obfuscation.py marked --key 1     # 4 marked CNNs, ~12 min
    .venv/bin/python experiments/obfuscation/run_obfuscation.py marked --key 2
    .venv/bin/python experiments/obfuscation/run_obfuscation.py clean --seeds 100-119   # ~2.5 min each
    .venv/bin/python experiments/obfuscation/run_obfuscation.py attacks            # permute+rescale, FTAL, prune
    .venv/bin/python experiments/obfuscation/run_obfuscation.py null               # clean models, alignment on
    .venv/bin/python experiments/obfuscation/run_obfuscation.py fingerprint        # the tracer
    .venv/bin/python experiments/obfuscation/run_obfuscation.py mlp                # MLP host: gated vs forced, ~10 min
    .venv/bin/python experiments/obfuscation/run_obfuscation.py mlp --clean-epochs 5   # clean MLPs of 5 epochs
    .venv/bin/python experiments/obfuscation/run_obfuscation.py report             # README tables

Results (JSON per part, ``README.md``) go to ``experiments/results/obfuscation/``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nnmark.alignment import align_model
from nnmark.attacks import Average, build_attack
from nnmark.attacks.obfuscate import max_output_change
from nnmark.attacks.prune import prune_by_magnitude
from nnmark.data import load_splits
from nnmark.io import load_model, save_model
from nnmark.keys import Key
from nnmark.models import model_spec
from nnmark.schemes import SCHEMES, load_scheme
from nnmark.train import TrainConfig, accuracy, seeded_model, train

OUT = Path("experiments/results/obfuscation")
CACHE = Path("runs/obfuscation")
LOG = CACHE / "commitments.db"
LAYER, BITS, EPOCHS, ALPHA = "conv4", 512, 10, 1e-6
METHODS = ["uchida", "projection", "wang-manu", "wang-auto"]


def cfg(seed: int) -> TrainConfig:
    return TrainConfig(epochs=EPOCHS, batch_size=64, lr=1e-3, seed=seed, progress=False)


def data():
    return load_splits("mnist5k")


def spec():
    return model_spec("cnn", data().train.image_shape, 10)


def marked_path(name: str, key: int) -> tuple[Path, Path]:
    return CACHE / f"{name}-k{key}.safetensors", CACHE / f"{name}-k{key}.key"


def clean_path(seed: int) -> Path:
    return CACHE / f"clean-{seed}.safetensors"


def clean_seeds() -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in CACHE.glob("clean-*.safetensors"))


def marked_keys() -> list[int]:
    return sorted({int(p.stem.split("-k")[1]) for p in CACHE.glob("*-k*.key")})


def load_marked(name: str, key: int):
    mpath, kpath = marked_path(name, key)
    return load_scheme(kpath, expect=name, log=LOG), load_model(mpath)[0]


def summary(v) -> dict[str, Any]:
    d = v.details
    out = {"p": float(v.p_value), "owned": bool(v.owned), "ber": float(d.get("ber", float("nan"))),
           "alignment": d.get("alignment", {}).get("alignment"),
           "quality": {n: round(q["mean_correlation"], 4)
                       for n, q in (d.get("alignment", {}).get("layers") or {}).items()}}
    if "block_p_values" in d:
        out["block_p"] = [float(p) for p in d["block_p_values"]]
    return out


def write(name: str, obj: Any) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps(obj, indent=1))


# -- parts ---------------------------------------------------------------------------------------------
def part_marked(key: int) -> None:
    splits = data()
    CACHE.mkdir(parents=True, exist_ok=True)
    for name in METHODS:
        mpath, kpath = marked_path(name, key)
        if kpath.exists():
            continue
        t = time.time()
        model = seeded_model(spec(), 1000 + key)
        scheme = SCHEMES[name].create(Key.from_seed(f"obfuscation-{name}-{key}"), model, layer=LAYER, bits=BITS)
        scheme.embed(model, splits.train, cfg(1000 + key))
        save_model(mpath, model, {"data": "mnist5k"})
        scheme.save(kpath, model_file=mpath, log=LOG)
        print(f"{name} key {key}: acc {accuracy(model, splits.test):.4f}, p {scheme.verify(model).p_value:.3g}, "
              f"{time.time() - t:.0f} s", flush=True)


def part_clean(seeds: list[int]) -> None:
    splits = data()
    CACHE.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        if clean_path(seed).exists():
            continue
        t = time.time()
        model = seeded_model(spec(), seed)
        train(model, splits.train, cfg(seed))
        save_model(clean_path(seed), model, {"data": "mnist5k"})
        print(f"clean {seed}: acc {accuracy(model, splits.test):.4f}, {time.time() - t:.0f} s", flush=True)


def part_attacks() -> None:
    splits = data()
    x = splits.test.x[:500]
    rows = []
    for key in marked_keys():
        for name in METHODS:
            scheme, model = load_marked(name, key)
            base = {"scheme": name, "key": key, "accuracy": accuracy(model, splits.test)}
            rows.append({**base, "attack": "none", "align_off": summary(scheme.verify(model, align=False)),
                         "align_on": summary(scheme.verify(model))})
            for seed in (1, 2, 3):
                stolen = build_attack("permute-rescale", seed=seed).attack(model)
                rows.append({**base, "attack": f"permute-rescale/{seed}",
                             "max_output_change": max_output_change(model, stolen, x),
                             "accuracy_after": accuracy(stolen, splits.test),
                             "align_off": summary(scheme.verify(stolen, align=False)),
                             "align_on": summary(scheme.verify(stolen))})
            ftal = build_attack("ftal", epochs=10, seed=key).attack(model, splits.attacker)
            pruned = load_marked(name, key)[1]
            prune_by_magnitude(pruned, 0.6, order="smallest", scope="layer", layers=[LAYER])
            for label, m in (("ftal+permute-rescale", ftal), ("prune60+permute-rescale", pruned)):
                stolen = build_attack("permute-rescale", seed=7).attack(m)
                rows.append({**base, "attack": label, "accuracy_after": accuracy(stolen, splits.test),
                             "unobfuscated": summary(scheme.verify(m, align=False)),
                             "align_off": summary(scheme.verify(stolen, align=False)),
                             "align_on": summary(scheme.verify(stolen))})
            for r in rows[-6:]:
                print(name, key, r["attack"], "off", f"{r['align_off']['p']:.3g}", "on", f"{r['align_on']['p']:.3g}",
                      flush=True)
    write("attacks", rows)


def part_null() -> None:
    rows = []
    seeds = clean_seeds()
    for key in marked_keys():
        for name in METHODS:
            scheme, _ = load_marked(name, key)
            for seed in seeds:
                model = load_model(clean_path(seed))[0]
                on = scheme.verify(model)
                off = scheme.verify(model, align=False)
                # what the alignment would make of it without the gate
                aligned, _ = align_model(model, scheme.reference, scheme.key.child("alignment"), carriers=[LAYER],
                                         min_correlation=0.0)
                forced = summary(scheme.verify(aligned, align=False))
                rows.append({"scheme": name, "key": key, "seed": seed, "align_on": summary(on),
                             "align_off": summary(off), "forced": forced})
            got = [r for r in rows if r["scheme"] == name and r["key"] == key]
            print(name, key, "min p", f"{min(r['align_on']['p'] for r in got):.3g}", "claims",
                  sum(r["align_on"]["owned"] for r in got), "forced claims", sum(r["forced"]["owned"] for r in got),
                  flush=True)
    write("null", rows)


def part_fingerprint() -> None:
    from nnmark.fingerprint import Product

    splits = data()
    seeds = clean_seeds()
    base_seed, null_seeds = seeds[0], seeds[1:]
    root = CACHE / "shop"
    if (root / "product.json").exists():
        prod = Product.open(root)
    else:
        prod = Product.create(root, clean_path(base_seed), key=Key.from_seed("obfuscation-shop"), code="ag:7",
                              data="mnist5k")
        prod.add_customers([f"c{i:02d}" for i in range(12)])
    names = [f"c{i:02d}" for i in range(12)]
    copies = {}
    for n in names:
        issued = prod.registry.issued_copies(n)
        path = issued[0].model_path if issued else prod.issue(n).model_path
        copies[n] = load_model(path)[0]
    rng = np.random.default_rng(5)
    rows = []
    for size in (1, 2, 3, 4, 5, 6):
        coalition = sorted(rng.choice(names, size, replace=False).tolist())
        avg = Average().attack([copies[n] for n in coalition])
        ftal = build_attack("ftal", epochs=5, seed=size).attack(avg, splits.attacker)
        for label, m in (("permute-rescale", avg), ("ftal+permute-rescale", ftal)):
            stolen = build_attack("permute-rescale", seed=size).attack(m)
            prod.align = False
            off = prod.trace(stolen)
            prod.align = True
            on = prod.trace(stolen)
            rows.append({"coalition": coalition, "attack": label, "accuracy": accuracy(stolen, splits.test),
                         "off": {"named": off.named, "status": off.status},
                         "on": {"named": on.named, "status": on.status,
                                "alignment": on.evidence.get("alignment")}})
            print(size, label, "off", off.named, "on", on.named, flush=True)
    clean_rows = []
    for seed in null_seeds:
        rep = prod.trace(load_model(clean_path(seed))[0])
        clean_rows.append({"seed": seed, "named": rep.named, "status": rep.status,
                           "alignment": (rep.evidence.get("alignment") or {}).get("alignment")})
    print("clean models named:", sum(bool(r["named"]) for r in clean_rows), "of", len(clean_rows))
    write("fingerprint", {"coalitions": rows, "clean": clean_rows})


def part_mlp(clean_epochs: int = 10) -> None:
    """The second host, where the gate matters most: MLP 784-64-10 on digits-28, 256 bits in the head (Wang,
    Uchida) or fc1's filter mean (projection), marked models trained 10 epochs; 20 clean MLPs (seeds 200-219,
    ``clean_epochs`` epochs) verified against marked models of two keys, with the alignment gate (default) and
    with the alignment forced on every model."""
    splits = load_splits("digits28")
    mspec = model_spec("mlp", splits.train.image_shape, 10)
    mcfg = TrainConfig(epochs=10, batch_size=32, lr=1e-3, progress=False)
    setups = {"uchida": {"layer": "head"}, "projection": {"layer": "fc1", "reduce": "mean"},
              "wang-manu": {"layer": "head"}, "wang-auto": {"layer": "head"}}
    cleans = []
    for seed in range(200, 220):
        m = seeded_model(mspec, seed)
        train(m, splits.train, TrainConfig(**{**mcfg.__dict__, "seed": seed, "epochs": clean_epochs}))
        cleans.append(m.eval())
    rows = []
    for key in (1, 2):
        for name, params in setups.items():
            model = seeded_model(mspec, 300 + key)
            scheme = SCHEMES[name].create(Key.from_seed(f"obfuscation-mlp-{name}-{key}"), model, bits=256, **params)
            scheme.embed(model, splits.train, TrainConfig(**{**mcfg.__dict__, "seed": 300 + key}))
            stolen = build_attack("permute-rescale", seed=key).attack(model)
            ftal = build_attack("permute-rescale", seed=key).attack(
                build_attack("ftal", epochs=10, batch_size=32, seed=key).attack(model, splits.attacker))
            rows.append({"scheme": name, "key": key, "kind": "marked", "align_on": summary(scheme.verify(model))})
            for label, m in (("permute-rescale", stolen), ("ftal+permute-rescale", ftal)):
                rows.append({"scheme": name, "key": key, "kind": label,
                             "align_off": summary(scheme.verify(m, align=False)),
                             "align_on": summary(scheme.verify(m))})
            for seed, m in zip(range(200, 220), cleans, strict=True):
                aligned, _ = align_model(m, scheme.reference, scheme.key.child("alignment"), carriers=[scheme.layer],
                                         min_correlation=0.0)
                rows.append({"scheme": name, "key": key, "kind": "clean", "seed": seed,
                             "align_on": summary(scheme.verify(m)),
                             "forced": summary(scheme.verify(aligned, align=False))})
            got = [r for r in rows if r["scheme"] == name and r["key"] == key and r["kind"] == "clean"]
            print(name, key, "gated claims", sum(r["align_on"]["owned"] for r in got), "forced claims",
                  sum(r["forced"]["owned"] for r in got), "attacked on",
                  [f"{r['align_on']['p']:.2g}" for r in rows if r["scheme"] == name and r["key"] == key
                   and r["kind"] not in ("clean", "marked")], flush=True)
    write("mlp" if clean_epochs == 10 else f"mlp-clean{clean_epochs}", rows)


def _null_rows(rows: list[dict[str, Any]], label: str) -> list[str]:
    from scipy import stats as sps

    out = []
    for name in METHODS:
        got = [r for r in rows if r["scheme"] == name and r.get("kind", "clean") == "clean"]
        if not got:
            continue
        for mode in ("align_on", "forced"):
            ps = np.array([r[mode]["p"] for r in got])
            claims = sum(r[mode]["owned"] for r in got)
            opened = sum(r[mode]["alignment"] == "on" for r in got) if mode == "align_on" else len(got)
            gate = [min(r["align_on"]["quality"].values()) for r in got if r["align_on"]["quality"]]
            blocks = np.concatenate([r[mode]["block_p"] for r in got if "block_p" in r[mode]] or [np.zeros(0)])
            bl = "-"
            if blocks.size:
                ks = sps.kstest(blocks, "uniform").pvalue
                bl = f"{np.mean(blocks < 0.05):.3f} / {np.mean(blocks < 0.01):.3f} (KS p {ks:.2g})"
            out.append(f"| {label} | {name} | {'gated (default)' if mode == 'align_on' else 'forced'} | {len(got)} | "
                       f"{opened} | {max(gate):.3f} | {claims} | {np.mean(ps < 0.05):.3f} / {np.mean(ps < 0.01):.3f} | "
                       f"{ps.min():.2g} | {bl} |")
    return out


def part_report() -> None:
    """``tables.md`` from the JSON files."""
    lines = ["# Tables (generated by `run_obfuscation.py report` from the JSON files)", ""]
    if (OUT / "attacks.json").exists():
        rows = json.loads((OUT / "attacks.json").read_text())
        lines += ["## Marked mnist5k CNNs (512 bits in conv4) under function-preserving attacks", "",
                  "| scheme | key | attack | max output change | acc. after | p, alignment off | p, alignment on | "
                  "gate statistic (min over conv3, conv4) | BER on |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            q = r["align_on"]["quality"]
            moc = r.get("max_output_change")
            lines.append(f"| {r['scheme']} | {r['key']} | {r['attack']} | {'' if moc is None else f'{moc:.1e}'} | "
                         f"{r.get('accuracy_after', r['accuracy']):.4f} | {r['align_off']['p']:.3g} | "
                         f"{r['align_on']['p']:.3g} | {min(q.values()) if q else float('nan'):.3f} | "
                         f"{r['align_on']['ber']:.4f} |")
        lines.append("")
    header = ["| host | scheme | alignment | clean verdicts | aligned | max gate statistic | claims (alpha 1e-6) | "
              "fraction p < 0.05 / 0.01 | min p | Wang block p < 0.05 / 0.01 |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    null = []
    if (OUT / "null.json").exists():
        null += _null_rows(json.loads((OUT / "null.json").read_text()), "mnist5k CNN")
    if (OUT / "mlp.json").exists():
        null += _null_rows(json.loads((OUT / "mlp.json").read_text()), "digits-28 MLP")
    if (OUT / "mlp-clean5.json").exists():
        null += _null_rows(json.loads((OUT / "mlp-clean5.json").read_text()), "digits-28 MLP, clean 5 epochs")
    if null:
        lines += ["## Clean models verified against the marked models (every key)", "", *header, *null, ""]
    if (OUT / "mlp.json").exists():
        rows = [r for r in json.loads((OUT / "mlp.json").read_text()) if r["kind"] not in ("clean",)]
        lines += ["## digits-28 MLP: marked and attacked", "", "| scheme | key | model | p, alignment off | "
                  "p, alignment on | gate statistic |", "|---|---|---|---|---|---|"]
        for r in rows:
            q = r["align_on"]["quality"]
            off = r.get("align_off", {}).get("p")
            lines.append(f"| {r['scheme']} | {r['key']} | {r['kind']} | {'' if off is None else f'{off:.3g}'} | "
                         f"{r['align_on']['p']:.3g} | {min(q.values()) if q else float('nan'):.3f} |")
        lines.append("")
    if (OUT / "fingerprint.json").exists():
        fp = json.loads((OUT / "fingerprint.json").read_text())
        lines += ["## Tracer (AG(2,7) on a clean mnist5k CNN, carrier conv4)", "",
                  "| coalition | attack | accuracy | named, alignment off | named, alignment on | gate statistic |",
                  "|---|---|---|---|---|---|"]
        for r in fp["coalitions"]:
            al = (r["on"].get("alignment") or {}).get("layers") or {}
            q = min(v["mean_correlation"] for v in al.values()) if al else float("nan")
            lines.append(f"| {', '.join(r['coalition'])} | {r['attack']} | {r['accuracy']:.4f} | "
                         f"{', '.join(r['off']['named']) or 'nobody'} | {', '.join(r['on']['named']) or 'nobody'} | "
                         f"{q:.3f} |")
        named = sum(bool(r["named"]) for r in fp["clean"])
        aligned = sum(r["alignment"] == "on" for r in fp["clean"])
        lines += ["", f"Clean models traced: {len(fp['clean'])}, aligned {aligned}, anyone named: {named}.", ""]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "tables.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    torch.set_num_threads(1)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["marked", "clean", "attacks", "null", "fingerprint", "mlp", "report"])
    ap.add_argument("--key", type=int, default=1)
    ap.add_argument("--seeds", default="100-119", help="range A-B or comma list")
    ap.add_argument("--clean-epochs", type=int, default=10, help="mlp: epochs of the clean MLPs")
    args = ap.parse_args()
    if args.part == "marked":
        part_marked(args.key)
    elif args.part == "clean":
        if "-" in args.seeds:
            a, b = (int(v) for v in args.seeds.split("-"))
            seeds = list(range(a, b + 1))
        else:
            seeds = [int(v) for v in args.seeds.split(",")]
        part_clean(seeds)
    else:
        parts = {"attacks": part_attacks, "null": part_null, "fingerprint": part_fingerprint,
                 "mlp": lambda: part_mlp(args.clean_epochs), "report": part_report}
        parts[args.part]()


if __name__ == "__main__":
    main()
