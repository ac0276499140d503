"""The ``nnmark`` command line.

Exit codes: 0 success (``verify``: the model is owned), 1 ``verify`` ran but the
model is not owned, 2 bad input (one-line ``error: ...`` on stderr, no
traceback), 3 an unexpected internal error (set ``NNMARK_DEBUG=1`` for the
traceback), 130 interrupted.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from nnmark.errors import NNMarkError

DEFAULT_EPOCHS = 15
# Fine-tune-to-embed (mnist5k CNN, n=100 triggers, 20 verification queries): 3 epochs left noise / content
# marks at 5/20 and 6/20 hits (p 0.06 / 0.02: not provable); 6 epochs: noise 15/20 (p 4e-11), content 8/20;
# 10 epochs: noise 14/20 (p 9e-10), content 11/20 (p 2e-6, still short of 1e-6 at 20 queries: embed says so).
FINETUNE_EPOCHS = 10


def _echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="nnmark")
def cli() -> None:
    """nnmark: watermark, fingerprint and verify ownership of PyTorch models."""


# --------------------------------------------------------------------------- train
@cli.command()
@click.option("--data", default="mnist5k", show_default=True,
              help="digits | digits28 | mnist5k | mnist-idx:DIR | cifar10:DIR | cifar100:DIR")
@click.option("--arch", default="cnn", show_default=True,
              help="cnn | cnn-200 | cnn-cifar | mlp | lenet5 | vgg-small")
@click.option("--epochs", default=DEFAULT_EPOCHS, show_default=True)
@click.option("--lr", default=1e-3, show_default=True)
@click.option("--optimizer", type=click.Choice(["adam", "sgd"]), default="adam", show_default=True)
@click.option("--batch-size", default=64, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--out", "out", type=click.Path(dir_okay=False), required=True, help="model file to write")
def train(data: str, arch: str, epochs: int, lr: float, optimizer: str, batch_size: int, seed: int,
          out: str) -> None:
    """Train a plain (unmarked) model on a dataset and save it."""
    from nnmark.data import load_data
    from nnmark.io import save_model
    from nnmark.train import TrainConfig, accuracy, seeded_model
    from nnmark.train import train as run_train

    splits = load_data(data)
    model = seeded_model(_spec(arch, splits), seed)
    cfg = TrainConfig(epochs=epochs, lr=lr, optimizer=optimizer, batch_size=batch_size, seed=seed)
    rec = run_train(model, splits.train, cfg, val=splits.val, description=f"train {arch}")
    acc = accuracy(model, splits.test)
    save_model(out, model, {"data": data, "training": rec.to_dict(), "test_accuracy": acc})
    click.echo(f"saved {out}: test accuracy {acc:.4f} after {rec.epochs_run} epochs ({rec.seconds:.1f} s)")


def _spec(arch: str, splits: Any) -> dict[str, Any]:
    from nnmark.models import model_spec

    try:
        return model_spec(arch, splits.image_shape, splits.num_classes)
    except ValueError as exc:
        raise NNMarkError(str(exc)) from None


# --------------------------------------------------------------------------- embed
@cli.command()
@click.option("--scheme", default="trigger", show_default=True, help="scheme name (see `nnmark schemes`)")
@click.option("--model", "base", type=click.Path(dir_okay=False),
              help="finished model to fine-tune the mark into (fine-tune-to-embed); "
                   "omit to train a new model with the mark (train-to-embed)")
@click.option("--data", default=None, help="dataset (default: the base model's, else mnist5k)")
@click.option("--arch", default="cnn", show_default=True, help="architecture when training from scratch")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE",
              help="scheme parameter, repeatable (e.g. generator=noise, n=100, labels=keyed)")
@click.option("--epochs", default=None, type=int,
              help=f"epochs (default {DEFAULT_EPOCHS} from scratch, {FINETUNE_EPOCHS} when fine-tuning)")
@click.option("--lr", default=1e-3, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--references", default=3, show_default=True,
              help="clean reference models to train for an empirical null (fixed-label trigger sets)")
@click.option("--key-out", type=click.Path(dir_okay=False), required=True,
              help="key file to write (mode 0600; keep it secret)")
@click.option("--key-seed", default=None, help="derive the key from this public seed (demos/tests only)")
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="marked model file to write")
@click.option("--commitment-log", type=click.Path(dir_okay=False), default=None,
              help="commitment log to append to (default: $NNMARK_COMMITMENT_LOG, else commitments.db beside "
                   "the key file)")
def embed(scheme: str, base: str | None, data: str | None, arch: str, params: tuple[str, ...],
          epochs: int | None, lr: float, seed: int, references: int, key_out: str, key_seed: str | None,
          out: str, commitment_log: str | None) -> int:
    """Embed a watermark: train a marked model, or fine-tune one into a finished model.

    The result is checked with the new key before the command ends: exit 0 when the mark is provable
    on the marked model (the verdict is printed), 1 when it is not (a warning with the figures; the
    files are still written).

    The key is committed when it is written: KEY_OUT.commit.json (public: no secret) holds the
    SHA-256 of the whole key file, of the marked model file, and the UTC time, and the same record
    is appended to a hash-chained commitment log. Publish the record (or have it timestamped by a
    third party): a verdict is evidence only for a key fixed before the suspect existed.
    """
    from nnmark.components import get_component
    from nnmark.data import load_data
    from nnmark.io import load_model, save_model
    from nnmark.keys import Key
    from nnmark.params import parse_assignments
    from nnmark.train import TrainConfig, accuracy, seeded_model
    from nnmark.train import train as run_train

    scheme_cls = get_component("scheme", scheme).load()
    given = parse_assignments(params)
    if Path(key_out).exists():
        raise NNMarkError(f"{key_out} exists; refusing to overwrite a key file")
    meta: dict[str, Any] = {}
    if base:
        model, meta = load_model(base)
        data = data or meta.get("data") or "mnist5k"
    splits = load_data(data or "mnist5k")
    if not base:
        model = seeded_model(_spec(arch, splits), seed)
    key = Key.from_seed(key_seed) if key_seed is not None else Key.generate()
    sch = scheme_cls.create(key, model, splits, **given)
    n_epochs = epochs if epochs is not None else (FINETUNE_EPOCHS if base else DEFAULT_EPOCHS)
    cfg = TrainConfig(epochs=n_epochs, lr=lr, seed=seed)
    rec = sch.embed(model, splits.train, cfg, val=splits.val,
                    description="fine-tune-to-embed" if base else "train-to-embed")
    if sch.needs_references():
        refs = []
        for i in range(references):
            ref = seeded_model(model.spec, 1000 + i)
            run_train(ref, splits.train, TrainConfig(epochs=n_epochs if not base else DEFAULT_EPOCHS,
                                                      lr=lr, seed=1000 + i), description=f"reference {i + 1}")
            refs.append(ref)
        if not refs:
            raise NNMarkError("a fixed-label trigger set needs --references >= 1 for its null")
        click.echo(f"calibrated on {len(refs)} reference models: {sch.calibrate(refs)}")
    acc = accuracy(model, splits.test)
    save_model(out, model, {"data": data or "mnist5k", "training": rec.to_dict(), "test_accuracy": acc,
                            "parent": meta.get("sha256") if base else None})
    record = sch.save(key_out, model_file=out, log=commitment_log)
    assert record is not None
    click.echo(f"saved {out}: test accuracy {acc:.4f}; key {key.key_id} written to {key_out} (mode 0600)")
    click.echo(f"key committed at {record.committed_at}: record {key_out}.commit.json (public), record SHA-256 "
               f"{record.record_sha256} -- publish it or have it timestamped to date the key")
    # The owner's own check: is the mark provable on the model just written (its own key, the default
    # verification options and alpha)? A mark that is not is reported with its figures (exit 1), never silently.
    check = sch.verify(model)
    if not check.owned:
        click.echo(f"warning: the mark is NOT provable with this key on the marked model itself: {check.summary()}; "
                   "embed longer (--epochs) or with stronger parameters", err=True)
        return 1
    click.echo(f"self-check: {check.summary()}")
    return 0


# --------------------------------------------------------------------------- verify
@cli.command()
@click.argument("suspect", required=False, type=click.Path(dir_okay=False))
@click.option("--key", "key_path", type=click.Path(dir_okay=False), required=True, help="the owner's key file")
@click.option("--url", default=None, help="verify a remote model through its prediction API instead")
@click.option("--queries", default=20, show_default=True, help="trigger queries (black-box schemes)")
@click.option("--alpha", default=1e-6, show_default=True, help="significance level")
@click.option("--budget", default=None, type=int, help="hard cap on images sent to the API")
@click.option("--timeout", default=10.0, show_default=True, help="seconds per HTTP request")
@click.option("--retries", default=2, show_default=True, help="retries on connection errors / 5xx")
@click.option("--protocol", type=click.Choice(["nnmark", "oip", "tfserving"]), default="nnmark", show_default=True,
              help="the API's protocol: nnmark serve's POST /predict, the Open Inference Protocol (KServe v2: "
                   "Triton, KServe, MLServer) or TF-Serving REST")
@click.option("--model-name", default=None, help="the served model's name (oip, tfserving; or put it in the --url)")
@click.option("--json", "as_json", is_flag=True, help="print the verdict as JSON")
@click.option("--tensor", "tensors", multiple=True, metavar="[LAYER=]NAME",
              help="the suspect's tensor holding the key's carrier layer (a bare state dict or ONNX file that names "
                   "it differently), e.g. --tensor backbone.conv4.weight or --tensor conv4=backbone.conv4.weight")
@click.option("--arch", default=None, metavar="MODULE:FACTORY",
              help="your architecture, for a bare state dict that must run (trigger sets, alignment): a trusted "
                   "'package.module:callable' that builds the nn.Module (never taken from the suspect)")
@click.option("--param", "verify_params", multiple=True, metavar="KEY=VALUE",
              help="a verification option of the key's scheme (e.g. align=false); see `nnmark schemes`")
@click.option("--commitment", "commitment", type=click.Path(dir_okay=False), default=None,
              help="the key's commitment record (default: KEY.commit.json beside the key file)")
@click.option("--commitment-log", type=click.Path(dir_okay=False), default=None,
              help="commitment log to check the record against (default: $NNMARK_COMMITMENT_LOG, else "
                   "commitments.db beside the key file; skipped if absent)")
@click.option("--suspect-seen-at", default=None, metavar="ISO-DATE",
              help="when the suspect was first seen (e.g. 2026-05-01 or 2026-05-01T12:00Z, UTC unless an "
                   "offset is given): a key committed at or after it is refused")
@click.option("--allow-uncommitted", is_flag=True,
              help="for a refused key (no / mismatching / late commitment) also report the raw statistic, "
                   "with a warning; it is still not evidence (exit 1)")
def verify(suspect: str | None, key_path: str, url: str | None, queries: int, alpha: float,
           budget: int | None, timeout: float, retries: int, as_json: bool, commitment: str | None,
           commitment_log: str | None, suspect_seen_at: str | None, allow_uncommitted: bool,
           protocol: str = "nnmark", model_name: str | None = None, tensors: tuple[str, ...] = (),
           arch: str | None = None, verify_params: tuple[str, ...] = ()) -> int:
    """Test a suspect model (a file, or --url of its API) for the owner's mark.

    A verdict is evidence only for a key fixed before the suspect existed: the key's commitment
    record must match the key file (and predate --suspect-seen-at, if given). A key without one,
    or with one that does not match, is refused: not owned, exit 1.

    Exit code 0 when owned, 1 when not (or refused).
    """
    from nnmark.commitment import parse_time
    from nnmark.io import file_sha256
    from nnmark.params import parse_assignments
    from nnmark.schemes import load_scheme

    if (suspect is None) == (url is None):
        raise NNMarkError("give exactly one of a SUSPECT model file or --url")
    seen = parse_time(suspect_seen_at) if suspect_seen_at is not None else None
    sch = load_scheme(key_path, commitment=commitment, log=commitment_log)
    # One path for every scheme: the suspect becomes a target (a model file in any format, or an API's
    # answers); the scheme reads what it needs from it (weights, or answers) and says so when it cannot.
    options = sch.VERIFY_PARAMS.resolve(parse_assignments(verify_params), owner=f"{sch.name} verify", partial=True)
    if "queries" in sch.VERIFY_PARAMS:
        options.setdefault("queries", queries)
    kwargs: dict[str, Any] = {"alpha": alpha, "suspect_seen_at": seen, "allow_uncommitted": allow_uncommitted,
                              **options}
    if url is not None:
        from nnmark.serving.client import HTTPOracle

        target: Any = HTTPOracle(url, budget=budget, timeout=timeout, retries=retries, protocol=protocol,
                                 model_name=model_name)
    else:
        from nnmark.targets import open_target
        from nnmark.targets.view import PinnedTarget

        target = open_target(suspect, factory=arch)
        if tensors:
            pins = {}
            for item in tensors:
                layer, _, name = item.rpartition("=")
                pins[layer.removesuffix(".weight") or "*"] = name
            target = PinnedTarget(target, pins)
    verdict = sch.verify(target, **kwargs)
    cdet = verdict.details.get("commitment")
    if suspect is not None and isinstance(cdet, dict):
        digest = file_sha256(suspect)
        cdet = {**cdet, "suspect_sha256": digest,
                "suspect_is_committed_model": cdet.get("model_sha256") is not None and cdet["model_sha256"] == digest}
        verdict = replace(verdict, details={**verdict.details, "commitment": cdet})
    refused = verdict.details.get("refused")
    if refused and "warning" in verdict.details:
        click.echo(f"WARNING: {verdict.details['warning']}", err=True)
    if as_json:
        click.echo(verdict.to_json(indent=2))
    else:
        if refused:
            click.echo(f"{verdict.scheme}: NOT EVIDENCE -- refused ({verdict.details['status']}): {refused}")
            if "unverified_p_value" in verdict.details:
                click.echo(f"  unverified statistic {verdict.statistic:g}/{verdict.n}, "
                           f"p = {verdict.details['unverified_p_value']:.3g} (not evidence)")
        else:
            click.echo(verdict.summary())
        click.echo(f"  H0: {verdict.null_hypothesis}")
        if isinstance(cdet, dict) and cdet.get("record_sha256"):
            click.echo(f"  key commitment: {cdet.get('status')}; record {cdet.get('record')} "
                       f"(SHA-256 {cdet['record_sha256']}), committed at {cdet.get('committed_at')}")
    return 0 if verdict.owned else 1


# --------------------------------------------------------------------------- attack
@cli.command()
@click.argument("model_paths", nargs=-1, required=True, type=click.Path(dir_okay=False), metavar="MODEL...")
@click.option("--attack", "name", required=True, help="an attack's name (see `nnmark schemes`), e.g. ftal, prune, "
              "average, permute-rescale")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE",
              help="attack parameter, repeatable (e.g. epochs=20, fraction=0.7, order=random); "
                   "`nnmark schemes --kind attack` lists each attack's parameters")
@click.option("--data", default=None, help="dataset the attacker draws from (default: the model's)")
@click.option("--data-fraction", default=0.1, show_default=True,
              help="attacker data, as a fraction of the owner's training-set size")
@click.option("--out", type=click.Path(dir_okay=False), required=True)
def attack(model_paths: tuple[str, ...], name: str, params: tuple[str, ...], data: str | None,
           data_fraction: float, out: str) -> None:
    """Attack one model, or several (collusion: average), and save the result."""
    from nnmark.attacks import build_attack
    from nnmark.data import load_data
    from nnmark.io import load_model, save_model
    from nnmark.params import parse_assignments
    from nnmark.tasks import task_of

    atk = build_attack(name, **parse_assignments(params))
    least, most = atk.models
    if len(model_paths) < least or (most is not None and len(model_paths) > most):
        raise NNMarkError(f"attack {name!r} takes {least if least == most else f'{least} or more'} model file(s), "
                          f"got {len(model_paths)}")
    loaded = [load_model(p) for p in model_paths]
    models = [m for m, _ in loaded]
    meta = loaded[0][1]
    splits = load_data(data or meta.get("data") or "mnist5k")
    att_data = None
    if atk.needs_data or getattr(atk, "finetune_epochs", 0):
        att_data = splits.attacker.take_fraction(min(1.0, data_fraction * len(splits.train) / len(splits.attacker)))
    stolen = atk.attack(models, att_data)
    task = task_of(stolen)
    fidelity = task.fidelity(stolen, splits.test.x, splits.test.y)
    save_model(out, stolen, {"data": meta.get("data"), "attack": atk.describe(), "test_fidelity": fidelity,
                             "test_accuracy" if task.name == "classification" else "test_psnr": fidelity})
    used = f" with {len(att_data)} attacker images" if att_data is not None else ""
    click.echo(f"saved {out}: {name} on {len(models)} model(s){used}; test {task.fidelity_name} {fidelity:.4f}")


# --------------------------------------------------------------------------- serve
@cli.command()
@click.argument("model_path", type=click.Path(dir_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, help="0 picks a free port")
@click.option("--max-batch", default=256, show_default=True, help="most images per request")
@click.option("--protocol", type=click.Choice(["nnmark", "oip"]), default="nnmark", show_default=True,
              help="oip: also serve the Open Inference Protocol (KServe v2; binary tensors) for the model "
                   "named after the file")
@click.option("--verbose", is_flag=True, help="log every request")
@click.option("--probabilities", is_flag=True, help="POST /predict also answers the softmax rows")
def serve(model_path: str, host: str, port: int, max_batch: int, protocol: str, verbose: bool,
          probabilities: bool) -> None:
    """Serve a model's predictions over HTTP (JSON POST /predict; --protocol oip adds /v2/...)."""
    from nnmark.serving.server import serve_model_file

    serve_model_file(model_path, host=host, port=port, max_batch=max_batch, verbose=verbose, protocol=protocol,
                     probabilities=probabilities)


# --------------------------------------------------------------------------- demo
@cli.command()
@click.option("--dataset", default="mnist5k", show_default=True, help="digits | digits28 | mnist5k")
@click.option("--epochs", default=None, type=int, help="training epochs (default: per dataset)")
@click.option("--workdir", type=click.Path(file_okay=False), default=None,
              help="keep the demo's files here (default: a temporary folder)")
@click.option("--json", "as_json", is_flag=True, help="print the results as one JSON object")
def demo(dataset: str, epochs: int | None, workdir: str | None, as_json: bool) -> None:
    """Embed a trigger-set watermark, attack the model, and verify over HTTP."""
    from nnmark.demo import run_demo

    result = run_demo(dataset=dataset, epochs=epochs, workdir=workdir, quiet=as_json)
    if as_json:
        _echo_json(result)


@cli.command()
@click.option("--kind", type=click.Choice(["scheme", "attack", "code", "dataset", "architecture"]), default=None,
              help="list only this kind of component")
@click.option("--json", "as_json", is_flag=True, help="every component with its declared parameters, as JSON")
def schemes(kind: str | None, as_json: bool) -> None:
    """List the components (schemes, attacks, datasets, ...) by name, with their parameters."""
    from nnmark.components import REGISTRY

    if as_json:
        _echo_json({"components": REGISTRY.describe(kind), "problems": REGISTRY.problems()})
        return
    for comp in REGISTRY.components(kind):
        origin = "" if comp.origin == "nnmark" else f" [{comp.origin}]"
        click.echo(f"{comp.kind:12s} {comp.name:16s} {comp.doc_line()}{origin}")
        for p in comp.params:
            click.echo(f"{'':30s}{p.summary()}")
    for line in REGISTRY.problems():
        click.echo(f"warning: {line}", err=True)


from nnmark.cli_fingerprint import fingerprint  # noqa: E402

cli.add_command(fingerprint)
from nnmark.cli_split import split  # noqa: E402

cli.add_command(split)
from nnmark.cli_outputs import outputs  # noqa: E402

cli.add_command(outputs)
from nnmark.cli_evaluate import evaluate  # noqa: E402

cli.add_command(evaluate)


def main(argv: list[str] | None = None) -> None:
    """Entry point: runs the CLI and turns errors into one-line messages."""
    debug = bool(os.environ.get("NNMARK_DEBUG"))
    try:
        rv = cli.main(args=argv, prog_name="nnmark", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        # One line like every other error (click's own show() prints usage and a hint on several).
        hint = ""
        if isinstance(exc, click.UsageError) and exc.ctx is not None:
            hint = f" (see '{exc.ctx.command_path} --help')"
        msg = " ".join(exc.format_message().split())
        click.echo(f"error: {msg}{hint}", err=True)
        sys.exit(2)
    except NNMarkError as exc:
        if debug:
            raise
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except (OSError, ValueError) as exc:
        if debug:
            raise
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except Exception as exc:  # noqa: BLE001 - last resort: never a raw traceback
        if debug:
            raise
        click.echo(f"error: internal {type(exc).__name__}: {exc} (set NNMARK_DEBUG=1 for a traceback)", err=True)
        sys.exit(3)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
