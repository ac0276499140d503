"""``nnmark split``: privacy-partitioned training across data owners and a server, and the attack on it.

    nnmark split train run/ --owners 3 --epochs 5 --defense adversarial --strength 10 --clip 1 [--engine ray]
    nnmark split train run/ ... --product shop/ --code ag:7 --code-index 3 --carrier fc3
    nnmark fingerprint issue --product shop/ --customers 20      # copies from the partitioned model, as usual
    nnmark split attack run/ [--attackers a1,a3,a8] [--unsplit] [--json]

``train`` writes ``run/model.safetensors`` (the assembled network), ``run/run.json`` (configuration, accuracy,
per-party reports, message counts); with ``--product`` the server embeds codeword ``--code-index`` of a new
product's code while training and the product is then created from the trained model with that key
(``shop/key.json``, 0600), ready for ``nnmark fingerprint issue`` / ``trace``. With ``--checkpoint-every``,
resumable checkpoints: re-running the same command after a crash resumes from the last complete round.
The run's session key is ``run/session.key.json`` (mode 0600, created on first use, never printed); each party's
own key is derived from it. ``--engine ray`` runs every party in its own process (``--address`` for an existing
Ray cluster). Progress: one line per party every ``--progress-every`` rounds, on stderr.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from nnmark.errors import NNMarkError

SESSION_KEY = "session.key.json"


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise NNMarkError(f"expected comma-separated integers, got {text!r}") from None


def _session_key(run: Path):
    from nnmark.keyfile import KeyFile, load_key_file, save_key_file
    from nnmark.keys import Key

    path = run / SESSION_KEY
    if path.exists():
        return load_key_file(path, expect_scheme="split-session").key
    key = Key.generate()
    save_key_file(path, KeyFile(key=key, scheme="split-session", params={}))
    return key


def _progress(r: int, stop: int, reports: list[dict[str, Any]]) -> None:
    parts = []
    for rep in reports:
        vals = " ".join(f"{k}={v:.4g}" for k, v in rep.items() if isinstance(v, float))
        parts.append(f"{rep['party']} {vals}".strip())
    click.echo(f"round {r}/{stop}: " + " | ".join(parts), err=True)


@click.group()
def split() -> None:
    """Privacy-partitioned training (owners keep their images) and reconstruction attacks on it."""


@split.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--data", default="mnist5k", show_default=True,
              help="bundled dataset or lfw-faces (its train split is dealt out)")
@click.option("--arch", default="mlp", show_default=True, type=click.Choice(["mlp", "cnn", "lenet5"]))
@click.option("--hidden", default="900,900,900,900", show_default=True, help="MLP hidden widths")
@click.option("--channels", default="16,16,32,32", show_default=True, help="CNN conv widths")
@click.option("--dropout", default=0.15, show_default=True, type=float)
@click.option("--at", "at", default="fc2", show_default=True, help="partition point: cut after this block")
@click.option("--owners", default=3, show_default=True, type=int)
@click.option("--epochs", default=5, show_default=True, type=int)
@click.option("--batch-size", default=32, show_default=True, type=int, help="per owner per round")
@click.option("--lr", default=1e-3, show_default=True, type=float)
@click.option("--defense", default="adversarial", show_default=True,
              type=click.Choice(["none", "adversarial", "artificial", "nopeek", "gaussian", "laplace"]))
@click.option("--strength", default=10.0, show_default=True, type=float, help="lambda, or the noise scale")
@click.option("--defenders", default="multiple", show_default=True,
              type=click.Choice(["none", "single", "multiple", "all"]))
@click.option("--defender-steps", default=1, show_default=True, type=int)
@click.option("--clip", default=None, type=float, help="stop the adversarial push at CLIP x the mean-image MSE")
@click.option("--ramp-rounds", default=0, show_default=True, type=int)
@click.option("--warm-rounds", default=0, show_default=True, type=int)
@click.option("--checkpoint-every", default=0, show_default=True, type=int, help="rounds between checkpoints")
@click.option("--seed", default=0, show_default=True, type=int, help="shards and the shared initialisation")
@click.option("--engine", default="local", show_default=True, type=click.Choice(["local", "ray"]),
              help="local: every party in this process; ray: one process per party")
@click.option("--address", default=None, help="Ray cluster address (default: start one on this machine)")
@click.option("--product", "product_dir", type=click.Path(file_okay=False), default=None,
              help="create this fingerprint product from the result; the server embeds --code-index while training")
@click.option("--code", default="ag:7", show_default=True, help="the product's identity code")
@click.option("--code-index", default=0, show_default=True, type=int, help="the codeword to embed")
@click.option("--carrier", "carriers", multiple=True, default=("fc3",), show_default=True,
              help="carrier layer(s), in the server's part")
@click.option("--fp-strength", default=5.0, show_default=True, type=float, help="mu of the regulariser")
@click.option("--progress-every", default=10, show_default=True, type=int)
def train(run_dir: str, data: str, arch: str, hidden: str, channels: str, dropout: float, at: str, owners: int,
          epochs: int, batch_size: int, lr: float, defense: str, strength: float, defenders: str,
          defender_steps: int, clip: float | None, ramp_rounds: int, warm_rounds: int, checkpoint_every: int,
          seed: int, engine: str, address: str | None, product_dir: str | None, code: str, code_index: int,
          carriers: tuple[str, ...], fp_strength: float, progress_every: int) -> None:
    """Train a model split between data owners and a server; write RUN_DIR/model.safetensors."""
    import torch

    from nnmark.io import save_model
    from nnmark.split.protocol import FingerprintPlan, SplitConfig, code_bit_errors, simulate

    torch.set_num_threads(1)
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    over: dict[str, Any] = {"dropout": dropout}
    if arch == "mlp":
        over["hidden"] = _ints(hidden)
    elif arch == "cnn":
        over.update(channels=_ints(channels), dense=[128, 128])
    cfg = SplitConfig(data=data, arch=arch, arch_overrides=over if arch != "lenet5" else {}, at=at, owners=owners,
                      epochs=epochs, batch_size=batch_size, lr=lr, defense=defense, strength=strength,
                      defenders=defenders if defense in ("adversarial", "artificial") else "none",
                      defender_steps=defender_steps, clip=clip, ramp_rounds=ramp_rounds, warm_rounds=warm_rounds,
                      checkpoint_every=checkpoint_every, seed=seed)
    session = _session_key(run)
    plan, layout, fkey = None, None, None
    if product_dir:
        from nnmark.fingerprint.product import CONFIG_NAME, build_layout
        from nnmark.keys import Key

        if (Path(product_dir) / CONFIG_NAME).exists():
            raise NNMarkError(f"a product already exists in {product_dir}")
        fkey = Key.generate()
        layout = build_layout(fkey, code)
        plan = FingerprintPlan(fkey, layout.compose(code_index), tuple(carriers), strength=fp_strength)
    every = progress_every if progress_every > 0 else 0
    out: dict[str, Any] = {"config": cfg.to_dict(), "engine": engine}
    if engine == "ray":
        from nnmark.split.parties import run_parties

        res = run_parties(cfg, session, run, fingerprint=plan, address=address, progress=_progress, every=every)
        out["messages"] = {p: _message_summary(recs) for p, recs in res.messages.items()}
        out.update(train_seconds=round(res.train_seconds, 2), restarts=res.restarts)
        model, acc, reports, seconds = res.model, res.accuracy, res.reports, res.seconds
    else:
        ck = str(run / "checkpoints") if checkpoint_every else None
        sim, owners_, server = simulate(cfg, session, plan, checkpoint_dir=ck, progress=_progress, every=every,
                                        keep=True)
        out["messages"] = {p.name: _message_summary(p.messages()) for p in [*owners_, server]}
        model, acc, reports, seconds = sim.model, sim.accuracy, sim.reports, sim.seconds
        if plan is not None and layout is not None and hasattr(layout.cic, "signs"):
            errors, bits = code_bit_errors(server.carrier, layout.cic, model, code_index)
            out["fingerprint"] = {"code_index": code_index, "bit_errors": errors, "bits": bits}
    save_model(run / "model.safetensors", model, {"data": data, "split": cfg.to_dict()})
    out.update(accuracy=acc, seconds=round(seconds, 2), reports=reports)
    (run / "run.json").write_text(json.dumps(out, indent=1))
    click.echo(f"accuracy {acc:.4f} after {epochs} epochs over {owners} owners ({seconds:.1f} s); "
               f"model: {run / 'model.safetensors'}")
    if "fingerprint" in out:
        fp = out["fingerprint"]
        click.echo(f"fingerprint code {code_index}: {fp['bit_errors']}/{fp['bits']} code bits wrong")
    if product_dir and fkey is not None:
        from nnmark.fingerprint import Product

        prod = Product.create(product_dir, run / "model.safetensors", key=fkey, code=code, layers=carriers,
                              data=data)
        click.echo(f"created product {prod.config.name!r} in {product_dir} from the partitioned model "
                   f"(key {prod.config.key_id}, mode 0600)")


def _message_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    kinds: dict[str, dict[str, Any]] = {}
    for r in records:
        k = kinds.setdefault(r["kind"], {"count": 0, "bytes": 0, "shapes": []})
        k["count"] += 1
        k["bytes"] += r["nbytes"]
        if r["shape"][1:] not in [s[1:] for s in k["shapes"]]:
            k["shapes"].append(r["shape"])
    return kinds


@split.command()
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--attackers", default="", help="attacker names (default: every one that fits the cut)")
@click.option("--targets", default=500, show_default=True, type=int, help="owners' images to reconstruct")
@click.option("--epochs", default=30, show_default=True, type=int, help="attacker training epochs")
@click.option("--unsplit", is_flag=True, help="also run the UnSplit inversion (architecture only)")
@click.option("--label-attackers", default="", help="attackers trained again reading the label too (name+y)")
@click.option("--json", "as_json", is_flag=True)
def attack(run_dir: str, attackers: str, targets: int, epochs: int, unsplit: bool, label_attackers: str,
           as_json: bool) -> None:
    """Reconstruct the owners' images from what the server of RUN_DIR saw; report MSE / SSIM / DPD / reprint."""
    import torch

    from nnmark.io import load_model
    from nnmark.safejson import loads
    from nnmark.split.attackers import AttackConfig
    from nnmark.split.evaluation import privacy_report
    from nnmark.split.protocol import SplitConfig

    torch.set_num_threads(1)
    run = Path(run_dir)
    if not (run / "run.json").is_file() or not (run / "model.safetensors").is_file():
        raise NNMarkError(f"{run} holds no finished split run (run.json and model.safetensors)")
    cfg = SplitConfig.from_dict(loads((run / "run.json").read_text(), what="run.json")["config"])
    model, _ = load_model(run / "model.safetensors")
    names = [a for a in attackers.split(",") if a.strip()] or None
    rep = privacy_report(model, cfg, names, n_targets=targets, attack=AttackConfig(epochs=epochs), unsplit=unsplit,
                         label_attackers=[a for a in label_attackers.split(",") if a.strip()])
    if as_json:
        click.echo(json.dumps(rep, indent=1))
        return
    fl = rep["floor"]
    click.echo(f"{'attacker':10s} {'MSE':>7s} {'SSIM':>6s} {'DPD':>6s} {'reprint':>7s}")
    for name, s in rep["attackers"].items():
        click.echo(f"{name:10s} {s['mse']:7.4f} {s['ssim']:6.3f} {s['dpd']:6.3f} {s['reprint_accuracy']:7.3f}")
    click.echo(f"{'mean image':10s} {fl['mse']:7.4f} {fl['ssim']:6.3f}   (the floor: an attacker that learns nothing)")
    for what, row, note in (("label", "label", "the label the server receives"),
                            ("predicted_label", "predicted", "the server's prediction")):
        b = fl[what]["best"]
        click.echo(f"{row:10s} {b['mse']:7.4f} {b['ssim']:6.3f}   (class {b['template'][6:]} "
                   f"of {note}: no activations used)")
    top = rep["best_with_labels"]
    click.echo(f"best attacker with the labels: {top['attacker']} SSIM {top['ssim']:.3f}")
