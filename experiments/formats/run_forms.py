"""One marked CNN verified in every form a suspect can take, with the p-values in one table.

Host: the Zhang CNN on mnist5k, trained once (8 epochs, seed 1) carrying two marks at the same time:
a white-box Uchida mark (256 bits in ``conv4``'s filter mean) and a black-box keyed trigger set
(100 abstract images, labels drawn from the key). The control is an independent clean CNN (seed 2).

The forms of the marked model:

- its nnmark model file (safetensors with the architecture spec);
- a bare state dict (``safetensors.torch.save_file``, no metadata), and one whose tensors carry a
  ``backbone.`` prefix, read with ``--tensor backbone.conv4.weight``;
- an ONNX export (TorchScript exporter) and two int8 copies of it made with onnxruntime's quantisers
  (dynamic: ``ConvInteger`` / ``MatMulInteger``; static QDQ calibrated on 256 training images);
- PyTorch int8 copies in memory: dynamic (``nn.Linear`` only; ``conv4`` stays float) and static
  (``Conv2d`` and ``Linear`` quantised, per-channel weights, calibrated on the same images), and their
  state dicts written with ``torch.save`` (``.pt``, read with ``torch.load(weights_only=True)``);
- the ONNX export behind MLServer (a real third-party Open Inference Protocol server, the onnxruntime
  runtime of ``tests/oip_onnx_runtime.py``), and the model file behind ``nnmark serve --protocol oip``.

Every file and server form is verified through the command line (``nnmark verify ... --json``, run in
process); the in-memory copies through ``scheme.verify``. White-box: matched bits of 256 under
``Binomial(256, 1/2)``, alignment as the verdict reports it (it needs a runnable model: off for weights
read from a state dict or an ONNX graph). Black-box: hits of 100 trigger queries under
``Binomial(100, 1/10)``. alpha = 1e-6 throughout.

Run (about 2 minutes on one core; files go to ``runs/forms/``, git-ignored, rebuilt on every run)::

    .venv/bin/python experiments/formats/run_forms.py

Results: ``experiments/results/formats/forms.md`` (the table) and ``forms.json`` (every verdict).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import requests
import torch
from safetensors.torch import save_file

from nnmark.cli import main as cli_main
from nnmark.data import load_data
from nnmark.io import file_sha256, save_model
from nnmark.keys import Key
from nnmark.models import model_spec
from nnmark.schemes import TriggerSetWatermark, Uchida, load_scheme
from nnmark.targets import open_target
from nnmark.targets.export import export_onnx, quantize_onnx, quantize_torch_dynamic, quantize_torch_static
from nnmark.train import TrainConfig, accuracy, seeded_model, train

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
WORK = ROOT / "runs" / "forms"
OUT = ROOT / "experiments" / "results" / "formats"
COMMAND = ".venv/bin/python experiments/formats/run_forms.py"
LAYER, BITS, TRIGGERS, QUERIES, EPOCHS = "conv4", 256, 100, 100, 8
MARKED_SEED, CLEAN_SEED, CALIBRATION = 1, 2, 256
START_TIMEOUT = 180.0  # seconds for a server to come up (two shared cores)


# -- the command line, in process ----------------------------------------------------------------------------

def nnmark(*args: str) -> dict[str, Any]:
    """``nnmark ARGS`` in process: ``{"argv", "exit_code", "verdict" (the --json object) or "error"}``."""
    out, err = io.StringIO(), io.StringIO()
    code: Any = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli_main(list(args))
        except SystemExit as exc:
            code = exc.code
    rec: dict[str, Any] = {"argv": ["nnmark", *[_rel(a) for a in args]], "exit_code": code}
    text = out.getvalue().strip()
    try:
        rec["verdict"] = json.loads(text)
    except json.JSONDecodeError:
        rec["error"] = _rel(err.getvalue().strip() or text)[-2000:]
    if err.getvalue().strip():
        rec["stderr"] = _rel(err.getvalue().strip())[-2000:]
    return rec


def in_memory(scheme: Any, model: torch.nn.Module, what: str, **kwargs: Any) -> dict[str, Any]:
    """``scheme.verify(model, **kwargs)`` as a record like :func:`nnmark`'s (exceptions kept as errors)."""
    rec: dict[str, Any] = {"call": f"{scheme.name}.verify({what}{''.join(f', {k}={v}' for k, v in kwargs.items())})"}
    try:
        rec["verdict"] = scheme.verify(model, **kwargs).to_dict()
    except Exception as exc:  # noqa: BLE001 - a form that fails is a result, reported with its message
        rec["error"] = f"{type(exc).__name__}: {exc}"
    return rec


def _rel(arg: str) -> str:
    return arg.replace(str(ROOT) + os.sep, "")


# -- servers ---------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """Stop the process group this script started (SIGTERM, then SIGKILL)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(15)


@contextlib.contextmanager
def mlserver(onnx_files: dict[str, Path]) -> Any:
    """MLServer serving each ``{name: model.onnx}`` through tests/oip_onnx_runtime.py; yields its URL and facts."""
    import mlserver as mls

    repo = WORK / "mlserver" / "repo"
    for name, src in onnx_files.items():
        (repo / name).mkdir(parents=True)
        shutil.copyfile(src, repo / name / "model.onnx")
        (repo / name / "model-settings.json").write_text(json.dumps(
            {"name": name, "implementation": "oip_onnx_runtime.OnnxModel", "parameters": {"uri": "./model.onnx"}}))
    port, grpc_port = _free_port(), _free_port()
    (repo / "settings.json").write_text(json.dumps(
        {"host": "127.0.0.1", "http_port": port, "grpc_port": grpc_port, "metrics_endpoint": None,
         "parallel_workers": 0, "debug": False}))
    exe = Path(sys.executable).with_name("mlserver")
    cmd = [str(exe)] if exe.exists() else [shutil.which("mlserver") or "mlserver"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    log_path = WORK / "mlserver" / "mlserver.log"
    log = log_path.open("w")
    started = time.monotonic()
    proc = subprocess.Popen([*cmd, "start", str(repo)], stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:  # ready when every model answers its readiness endpoint
            if proc.poll() is not None:
                raise RuntimeError(f"MLServer exited: {log_path.read_text()[-2000:]}")
            if time.monotonic() - started > START_TIMEOUT:
                raise RuntimeError("MLServer did not become ready in time")
            try:
                if all(requests.get(f"{url}/v2/models/{n}/ready", timeout=2).status_code == 200 for n in onnx_files):
                    break
            except requests.exceptions.ConnectionError:
                pass
            time.sleep(0.2)
        yield {"url": url, "version": mls.__version__, "startup_s": round(time.monotonic() - started, 1)}
    finally:
        _stop(proc)
        log.close()


@contextlib.contextmanager
def nnmark_serve(model_file: Path) -> Any:
    """``nnmark serve MODEL --port 0 --protocol oip`` in its own process; yields the URL of its OIP model."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "nnmark.cli", "serve", str(model_file), "--port", "0",
                             "--protocol", "oip"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    try:
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
        try:
            line = lines.get(timeout=START_TIMEOUT)
        except queue.Empty:
            raise RuntimeError("nnmark serve did not print its URL in time") from None
        m = re.search(r"(http://127\.0\.0\.1:\d+/v2/models/[\w.-]+)", line)
        if not m:
            raise RuntimeError(f"nnmark serve's first line has no OIP URL: {line!r} (exit {proc.poll()})")
        yield {"url": m.group(1), "ready_line": line.strip(), "startup_s": round(time.monotonic() - started, 1)}
    finally:
        _stop(proc)
        for stream in (proc.stdout, proc.stderr):
            stream.close()


# -- the models and their forms ------------------------------------------------------------------------------

def train_models(splits: Any) -> dict[str, Any]:
    """The doubly marked CNN (keys saved and committed) and the clean control, saved as model files."""
    cfg = TrainConfig(epochs=EPOCHS, seed=MARKED_SEED, progress=False)
    spec = model_spec("cnn", splits.image_shape, 10)
    t0 = time.monotonic()
    marked = seeded_model(spec, MARKED_SEED)
    uchida = Uchida.create(Key.from_seed("forms-uchida"), marked, layer=LAYER, bits=BITS)
    trig = TriggerSetWatermark.create(Key.from_seed("forms-trigger"), marked, splits, generator="abstract",
                                      n=TRIGGERS)
    hooks = [uchida.training_hook(), trig.training_hook()]
    train(marked, splits.train, cfg, hooks=hooks)
    for hook in hooks:
        hook.finalize(marked)
    marked.eval()
    marked_s = time.monotonic() - t0
    marked_file = save_model(WORK / "marked.safetensors", marked, {"data": "mnist5k"})
    uchida.save(WORK / "uchida.key", model_file=marked_file)
    trig.save(WORK / "trig.key", model_file=marked_file)

    t0 = time.monotonic()
    clean = seeded_model(spec, CLEAN_SEED)
    train(clean, splits.train, TrainConfig(epochs=EPOCHS, seed=CLEAN_SEED, progress=False))
    clean.eval()
    clean_s = time.monotonic() - t0
    clean_file = save_model(WORK / "clean.safetensors", clean, {"data": "mnist5k"})
    return {"marked": marked, "clean": clean, "marked_file": marked_file, "clean_file": clean_file,
            "train_s": {"marked": round(marked_s, 1), "clean": round(clean_s, 1)}}


def make_forms(models: dict[str, Any], splits: Any) -> dict[str, Path]:
    """Write the file forms of the marked model (and the clean one's ONNX export); returns their paths."""
    marked, clean = models["marked"], models["clean"]
    example = splits.test.x[:2]
    state = {k: v.detach().contiguous() for k, v in marked.state_dict().items()}
    paths = {"state_dict": WORK / "state_dict.safetensors", "renamed": WORK / "renamed.safetensors"}
    save_file(state, str(paths["state_dict"]))
    save_file({f"backbone.{k}": v for k, v in state.items()}, str(paths["renamed"]))
    paths["onnx"] = export_onnx(marked, WORK / "marked.onnx", example, dynamo=False)
    paths["onnx_int8_dynamic"] = quantize_onnx(paths["onnx"], WORK / "marked-int8-dynamic.onnx", mode="dynamic")
    paths["onnx_int8_qdq"] = quantize_onnx(paths["onnx"], WORK / "marked-int8-qdq.onnx", mode="static",
                                           calibration=splits.train.x[:CALIBRATION], fmt="qdq")
    paths["clean_onnx"] = export_onnx(clean, WORK / "clean.onnx", example, dynamo=False)
    return paths


def readout_diff(target: Any, name: str, float_weight: torch.Tensor) -> float:
    """Largest absolute difference between the carrier weight the form gives back (dequantised for int8) and the
    float model's (its max |w| is in the setup)."""
    return float((target.weights()[name].float() - float_weight).abs().max())


def _onnx_labels(path: Path, x: torch.Tensor) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    (logits,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    return logits.argmax(1)


def _torch_labels(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(x).argmax(1).numpy()


def fidelity(labels: np.ndarray, reference: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Test accuracy of a form and its label agreement with the float marked model (test set)."""
    return {"test_accuracy": round(float((labels == y).mean()), 4),
            "agreement_with_float": round(float((labels == reference).mean()), 4)}


# -- the run -------------------------------------------------------------------------------------------------

def row(form: str, kind: str, white: dict | None, black: dict | None, **extra: Any) -> dict[str, Any]:
    return {"form": form, "model": kind, "white_box": white, "black_box": black, **extra}


def run() -> dict[str, Any]:
    t_start = time.monotonic()
    if WORK.exists():
        shutil.rmtree(WORK)
    WORK.mkdir(parents=True)
    splits = load_data("mnist5k")
    models = train_models(splits)
    marked, clean = models["marked"], models["clean"]
    print(f"trained: marked {models['train_s']['marked']} s, clean {models['train_s']['clean']} s", flush=True)
    paths = make_forms(models, splits)
    mfile, cfile = models["marked_file"], models["clean_file"]
    ukey, tkey = str(WORK / "uchida.key"), str(WORK / "trig.key")
    uchida, trig = load_scheme(ukey), load_scheme(tkey)  # the committed keys, read back from their files

    def white(path: Path, *more: str) -> dict:
        return nnmark("verify", str(path), "--key", ukey, *more, "--json")

    def black(*target: str) -> dict:
        return nnmark("verify", *target, "--key", tkey, "--queries", str(QUERIES), "--json")

    x, y = splits.test.x, splits.test.y.numpy()
    float_w = marked.state_dict()[f"{LAYER}.weight"]
    ref = _torch_labels(marked, x)
    torch_dyn = quantize_torch_dynamic(marked)
    torch_static = quantize_torch_static(marked, splits.train.x[:CALIBRATION])
    paths["pt_int8_dynamic"], paths["pt_int8_static"] = WORK / "marked-int8-dynamic.pt", WORK / "marked-int8-static.pt"
    torch.save(torch_dyn.state_dict(), paths["pt_int8_dynamic"])
    torch.save(torch_static.state_dict(), paths["pt_int8_static"])
    fid = {"nnmark_file": fidelity(ref, ref, y), "onnx": fidelity(_onnx_labels(paths["onnx"], x), ref, y),
           "onnx_int8_dynamic": fidelity(_onnx_labels(paths["onnx_int8_dynamic"], x), ref, y),
           "onnx_int8_qdq": fidelity(_onnx_labels(paths["onnx_int8_qdq"], x), ref, y),
           "torch_int8_dynamic": fidelity(_torch_labels(torch_dyn, x), ref, y),
           "torch_int8_static": fidelity(_torch_labels(torch_static, x), ref, y),
           "clean": fidelity(_torch_labels(clean, x), ref, y)}
    print("fidelity:", json.dumps(fid), flush=True)

    rows = [
        row("nnmark model file", "marked", white(mfile), black(str(mfile)), file=mfile),
        row("bare state dict (safetensors, no metadata)", "marked", white(paths["state_dict"]),
            black(str(paths["state_dict"])), file=paths["state_dict"]),
        row("bare state dict, tensors renamed backbone.* (--tensor backbone.conv4.weight)", "marked",
            white(paths["renamed"], "--tensor", "backbone.conv4.weight"), None, file=paths["renamed"]),
        row("ONNX export (TorchScript exporter)", "marked", white(paths["onnx"]), black(str(paths["onnx"])),
            file=paths["onnx"]),
        row("ONNX int8, dynamic (ConvInteger/MatMulInteger)", "marked", white(paths["onnx_int8_dynamic"]),
            black(str(paths["onnx_int8_dynamic"])), file=paths["onnx_int8_dynamic"]),
        row("ONNX int8, static QDQ (256 calibration images)", "marked", white(paths["onnx_int8_qdq"]),
            black(str(paths["onnx_int8_qdq"])), file=paths["onnx_int8_qdq"]),
        row("PyTorch int8, dynamic (Linear only), in memory", "marked",
            in_memory(uchida, torch_dyn, "quantize_torch_dynamic(marked)"),
            in_memory(trig, torch_dyn, "quantize_torch_dynamic(marked)", queries=QUERIES),
            carrier_max_abs_diff=readout_diff(open_target(torch_dyn), f"{LAYER}.weight", float_w)),
        row("PyTorch int8, static (Conv2d+Linear), in memory", "marked",
            in_memory(uchida, torch_static, "quantize_torch_static(marked)"),
            in_memory(trig, torch_static, "quantize_torch_static(marked)", queries=QUERIES),
            carrier_max_abs_diff=readout_diff(open_target(torch_static), f"{LAYER}.weight", float_w)),
        row("PyTorch int8, static, in memory as open_target(...), carrier pinned (tensors={'conv4': 'conv4.weight'})",
            "marked",
            in_memory(uchida, open_target(torch_static), "open_target(quantize_torch_static(marked))",
                      tensors={LAYER: f"{LAYER}.weight"}),
            None, carrier_max_abs_diff=readout_diff(open_target(torch_static), f"{LAYER}.weight", float_w)),
        row("PyTorch int8 dynamic state dict (torch.save .pt)", "marked", white(paths["pt_int8_dynamic"]), None,
            file=paths["pt_int8_dynamic"]),
        row("PyTorch int8 static state dict (torch.save .pt)", "marked", white(paths["pt_int8_static"]), None,
            file=paths["pt_int8_static"]),
    ]
    print("file forms verified", flush=True)

    servers: dict[str, Any] = {}
    with mlserver({"marked": paths["onnx"], "clean": paths["clean_onnx"]}) as srv:
        servers["mlserver"] = srv
        print(f"MLServer {srv['version']} ready after {srv['startup_s']} s", flush=True)
        rows.append(row("ONNX export behind MLServer (OIP)", "marked", None,
                        black("--url", f"{srv['url']}/v2/models/marked", "--protocol", "oip"), server="mlserver"))
        mls_clean = black("--url", f"{srv['url']}/v2/models/clean", "--protocol", "oip")
    with nnmark_serve(mfile) as srv:
        servers["nnmark_serve"] = srv
        print(f"nnmark serve ready after {srv['startup_s']} s", flush=True)
        rows.append(row("model file behind nnmark serve --protocol oip", "marked", None,
                        black("--url", srv["url"], "--protocol", "oip"), server="nnmark serve"))

    rows += [
        row("nnmark model file", "clean", white(cfile), black(str(cfile)), file=cfile),
        row("ONNX export (TorchScript exporter)", "clean", white(paths["clean_onnx"]),
            black(str(paths["clean_onnx"])), file=paths["clean_onnx"]),
        row("ONNX export behind MLServer (OIP)", "clean", None, mls_clean, server="mlserver"),
    ]
    for r in rows:
        if "file" in r:
            p = Path(r["file"])
            r["file"] = {"path": _rel(str(p)), "bytes": p.stat().st_size, "sha256": file_sha256(p)}
            name = f"backbone.{LAYER}.weight" if p == paths["renamed"] else f"{LAYER}.weight"
            r["carrier_max_abs_diff"] = readout_diff(open_target(p), name, float_w)

    return {"command": COMMAND, "setup": {
        "data": "mnist5k", "arch": "cnn", "epochs": EPOCHS, "marked_seed": MARKED_SEED, "clean_seed": CLEAN_SEED,
        "uchida": {"layer": LAYER, "bits": BITS, "key": "Key.from_seed('forms-uchida')"},
        "trigger": {"generator": "abstract", "n": TRIGGERS, "labels": "keyed", "queries": QUERIES,
                    "key": "Key.from_seed('forms-trigger')"},
        "carrier_max_abs_weight": float(marked.state_dict()[f"{LAYER}.weight"].abs().max()),
        "alpha": 1e-6, "test_images": len(splits.test), "calibration_images": CALIBRATION, "train_s": models["train_s"],
        "accuracy": {"marked": round(accuracy(marked, splits.test), 4),
                     "clean": round(accuracy(clean, splits.test), 4)},
        "fidelity": fid, "servers": servers,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "onnxruntime": ort.__version__,
                     "mlserver": servers.get("mlserver", {}).get("version")},
        "wall_s": round(time.monotonic() - t_start, 1)}, "rows": rows}


# -- the report ----------------------------------------------------------------------------------------------

def _p(p: float) -> str:
    return f"{p:.2g}" if p >= 1e-300 else "< 1e-300"


ALIGN_REASONS = (("weights only", "weights only"), ("units do not match", "gate: units do not match"),
                 ("hidden layers", "layer chain not recognised"), ("turned off", "turned off"))


def _cell(rec: dict | None, kind: str) -> str:
    if rec is None:
        return "— | — | —" + (" | —" if kind == "white" else "")
    if "verdict" not in rec:
        return "no verdict (below) | | " + (" |" if kind == "white" else "")
    v = rec["verdict"]
    owned = "**yes**" if v["owned"] else "no"
    stat = f"{int(v['statistic'])}/{v['n']}"
    if kind == "white":
        align = v["details"].get("alignment", {})
        on, reason = align.get("alignment", "?"), align.get("reason", "")
        why = "" if on == "on" else next((f" ({label})" for needle, label in ALIGN_REASONS if needle in reason),
                                         f" ({reason})")
        return f"{stat} | {_p(v['p_value'])} | {owned} | {on}{why}"
    return f"{stat} | {_p(v['p_value'])} | {owned}"


def report(res: dict[str, Any]) -> str:
    s = res["setup"]
    lines = [
        "# One marked CNN, every form: white-box and black-box verdicts", "",
        "```bash", res["command"], "```", "",
        f"Host: the `cnn` on mnist5k, {s['epochs']} epochs, seed {s['marked_seed']}, carrying two marks at once: "
        f"Uchida, {s['uchida']['bits']} bits in `{s['uchida']['layer']}`, and a keyed trigger set of "
        f"{s['trigger']['n']} abstract images; test accuracy {s['accuracy']['marked']:.4f}. Control: an "
        f"independent clean `cnn` (seed {s['clean_seed']}), accuracy {s['accuracy']['clean']:.4f}. "
        f"White-box: matched bits under Binomial({s['uchida']['bits']}, 1/2); black-box: hits of "
        f"{s['trigger']['queries']} trigger queries under Binomial({s['trigger']['queries']}, 1/10); "
        f"owned when p < {s['alpha']:g}. File and server forms through `nnmark verify ... --json` "
        "(ONNX files run with onnxruntime for the black-box test), in-memory copies through `scheme.verify`.",
        "",
        "| form | model | white-box bits | p | owned | alignment | black-box hits | p | owned | max abs diff |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        diff = r.get("carrier_max_abs_diff")
        lines.append(f"| {r['form']} | {r['model']} | {_cell(r['white_box'], 'white')} | "
                     f"{_cell(r['black_box'], 'black')} | {'—' if diff is None else f'{diff:.2g}'} |")
    lines += ["", f"max abs diff: the largest absolute difference between the `{s['uchida']['layer']}.weight` the "
              "form gives back (int8: dequantised) and the float marked model's "
              f"(whose largest |w| is {s['carrier_max_abs_weight']:.3g}); for the clean model, against the "
              "marked one."]
    lines += ["", f"Fidelity of the forms on the {s['test_images']} test images (accuracy; label agreement with "
              "the float marked model):", "", "| form | test accuracy | agreement with float |", "|---|---|---|"]
    for name, f in s["fidelity"].items():
        lines.append(f"| {name} | {f['test_accuracy']:.4f} | {f['agreement_with_float']:.4f} |")
    notes = []
    for r in res["rows"]:
        for side in ("white_box", "black_box"):
            rec = r[side]
            if rec is not None and "verdict" not in rec:
                notes.append(f"- {r['form']} ({r['model']}), {side.replace('_', '-')}: exit "
                             f"{rec.get('exit_code', '-')}: `{rec.get('error', '')}`")
    if notes:
        lines += ["", "Forms that gave no verdict:", "", *notes]
    srv = s["servers"]
    lines += ["", f"MLServer {srv.get('mlserver', {}).get('version')} ready after "
              f"{srv.get('mlserver', {}).get('startup_s')} s; nnmark serve after "
              f"{srv.get('nnmark_serve', {}).get('startup_s')} s. Training: marked {s['train_s']['marked']} s, "
              f"clean {s['train_s']['clean']} s; whole run {s['wall_s']} s (torch {s['versions']['torch']}, "
              f"onnxruntime {s['versions']['onnxruntime']}, one thread). Every verdict's fields: `forms.json`.", ""]
    return "\n".join(lines)


def main() -> None:
    global EPOCHS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=EPOCHS, help=f"training epochs (default {EPOCHS})")
    ap.add_argument("--out", type=Path, default=OUT, help="results folder (default experiments/results/formats)")
    args = ap.parse_args()
    EPOCHS = args.epochs
    torch.set_num_threads(1)
    res = run()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "forms.json").write_text(_rel(json.dumps(res, indent=1, default=str)) + "\n")
    (args.out / "forms.md").write_text(report(res))
    print(report(res))


if __name__ == "__main__":
    main()
