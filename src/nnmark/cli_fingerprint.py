"""``nnmark fingerprint``: issue per-customer fingerprinted copies and trace leaked ones.

    nnmark fingerprint issue --product shop/ --base base.safetensors --customers 20 [--code ag:7]
    nnmark fingerprint trace leaked.safetensors --product shop/ [--json]

``issue`` creates the product on first use (key file ``shop/key.json``, mode 0600,
never printed), registers the customers that are new, and issues a copy to every
listed customer that has none yet (so re-running after a crash resumes). ``trace``
exits 0 when it names colluders, 1 when it names nobody, 2 on bad input.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from nnmark.errors import NNMarkError


def _customer_names(customers: str, graph_nodes: list[str] | None) -> list[str]:
    if customers.isdigit():
        n = int(customers)
        if n < 1:
            raise NNMarkError("--customers must be a positive number or a file of names")
        if graph_nodes is not None:
            if n > len(graph_nodes):
                raise NNMarkError(f"--customers {n} but the graph has only {len(graph_nodes)} nodes")
            return graph_nodes[:n]
        width = max(4, len(str(n)))
        return [f"customer-{i:0{width}d}" for i in range(1, n + 1)]
    path = Path(customers)
    if not path.is_file():
        raise NNMarkError(f"--customers: {customers!r} is neither a number nor a file of names")
    names = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not names:
        raise NNMarkError(f"{path} lists no customer")
    if len(set(names)) != len(names):
        raise NNMarkError(f"{path} lists a customer twice")
    return names


@click.group()
def fingerprint() -> None:
    """Per-customer fingerprints: issue copies, trace leaks and collusions."""


@fingerprint.command()
@click.option("--product", "product_path", required=True, type=click.Path(),
              help="product directory (created on first use) or its registry database")
@click.option("--base", "base", type=click.Path(dir_okay=False), default=None,
              help="the vendor's base model file (needed when the product is created)")
@click.option("--customers", required=True, help="a number N, or a file with one customer name a line")
@click.option("--graph", type=click.Path(dir_okay=False), default=None,
              help="SNAP edge list of the customers' social graph (node ids are customer names)")
@click.option("--crc-bits", default=15, show_default=True, help="community code length when --graph is given")
@click.option("--code", default="ag:7", show_default=True,
              help="identity code: ag:Q, pg:Q, ag:Qx2 (two codebooks) or ag:QrsL (L codebooks, Reed-Solomon chained)")
@click.option("--layer", "layers", multiple=True, default=("conv4",), show_default=True,
              help="carrier layer(s), repeatable")
@click.option("--train", "train_mode", type=click.Choice(["carrier", "all", "none"]), default="none",
              show_default=True, help="what an issuing fine-tune trains before the correction ('none': the "
              "closed-form correction only)")
@click.option("--correction", type=click.Choice(["activation", "min-norm"]), default="activation",
              show_default=True, help="closed-form correction: the change conv4's inputs feel least, or the "
              "smallest weight change")
@click.option("--steps", default=45, show_default=True, help="fine-tune steps per copy")
@click.option("--lr", default=3e-2, show_default=True, help="fine-tune learning rate")
@click.option("--data", default=None, help="training data for the fine-tune (default: the base model's)")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True)
@click.option("--workers", default=1, show_default=True, help="parallel issuers (processes / Ray tasks)")
@click.option("--key", "key_file", type=click.Path(dir_okay=False), default=None,
              help="product key file (default: key.json in the product directory)")
@click.option("--key-seed", default=None, help="derive a new product's key from this public seed (tests only)")
@click.option("--capacity", default=10000, show_default=True,
              help="black-box (tardos:M) products: codes the registry holds (customers it can serve)")
@click.option("--colluders", default=5, show_default=True,
              help="black-box products: design coalition size c (the Tardos cutoff is 1/(300 c))")
@click.option("--noise", default=0.1, show_default=True,
              help="black-box products: std of the triggers' keyed perturbation (pixels in [0, 1])")
@click.option("--issue-method", type=click.Choice(["finetune", "tilt"]), default="finetune", show_default=True,
              help="black-box products: fine-tune each copy (labels and scores carry the code), or tilt its output "
              "layer in closed form (no training; exact under weight averaging; traced through scores only)")
@click.option("--tilt-delta", default=0.25, show_default=True,
              help="black-box tilt: logit units each trigger's keyed-label difference moves")
@click.option("--json", "as_json", is_flag=True, help="print the issued copies as JSON")
def issue(product_path: str, base: str | None, customers: str, graph: str | None, crc_bits: int, code: str,
          layers: tuple[str, ...], train_mode: str, correction: str, steps: int, lr: float, data: str | None,
          engine: str, workers: int, key_file: str | None, key_seed: str | None, capacity: int, colluders: int,
          noise: float, issue_method: str, tilt_delta: float, as_json: bool) -> int:
    """Register customers and issue each a fingerprinted copy of the base model.

    With --code tardos:M the product is a black-box one (traced through a prediction API): each copy is
    fine-tuned to answer M keyed trigger queries by its Tardos codeword."""
    from nnmark.blackbox.commands import parse_tardos
    from nnmark.blackbox.product import is_blackbox_product

    if parse_tardos(code) is not None or is_blackbox_product(product_path):
        ctx = click.get_current_context()
        given = {n: ctx.get_parameter_source(n) != click.core.ParameterSource.DEFAULT for n in ("steps", "lr")}
        return _issue_blackbox(product_path, base, customers, code, steps if given["steps"] else None,
                               lr if given["lr"] else None, data, workers, key_file, key_seed, capacity, colluders,
                               noise, as_json, method=issue_method, delta=tilt_delta)
    from nnmark.fingerprint import IssueConfig, Product, issue_many
    from nnmark.keys import Key

    graph_obj = None
    nodes = None
    if graph is not None:
        from nnmark.data import load_edge_list

        graph_obj = load_edge_list(graph)
        nodes = [str(n) for n in graph_obj.nodes()]
    names = _customer_names(customers, nodes)
    root = Path(product_path)
    is_new = not (root / "product.json").exists() and not root.is_file() and "://" not in product_path
    if is_new:
        if base is None:
            raise NNMarkError(f"{product_path} is not a product yet: give --base to create it")
        key = Key.from_seed(key_seed) if key_seed is not None else Key.generate()
        prod = Product.create(root, base, key=key, code=code, crc_bits=crc_bits if graph_obj is not None else 0,
                              layers=layers, data=data,
                              issue=IssueConfig(train=train_mode, finetune_steps=steps, lr=lr,
                                                correction=correction))
        click.echo(f"created product {prod.config.name!r} in {root} (code {code}, capacity {prod.layout.n_codes} "
                   f"customers, key {prod.config.key_id} in {prod.key_for_workers()}, mode 0600)", err=as_json)
    else:
        prod = Product.open(product_path, key_file=key_file)
        if base is not None:
            from nnmark.io import file_sha256

            if file_sha256(base) != prod.config.base_sha256:
                raise NNMarkError(f"--base {base} is not this product's base model")
    known = {c.name for c in prod.registry.customers()}
    new = [n for n in names if n not in known]
    if new:
        if prod.config.crc_bits:
            if graph_obj is None:
                raise NNMarkError("this product uses community codes: give the customers' --graph")
            prod.add_customers_from_graph(graph_obj, new)
        else:
            prod.add_customers(new)
    prod.recover(older_than_s=0.0)
    todo = prod.pending_customers(names)
    capacity_left = prod.registry.counts().get("codes_free", 0)
    if len([n for n in todo if prod.registry.customer(n).code_index is None]) > capacity_left:
        raise NNMarkError(f"only {capacity_left} codes left in this product's {prod.config.code} code; "
                          "issue fewer customers or create a product with a larger code")
    outcomes = issue_many(prod.root if "://" not in product_path and not root.is_file() else product_path,
                          todo, engine=engine, workers=workers, key_file=key_file)
    failed = [o for o in outcomes if not o.ok]
    if as_json:
        click.echo(json.dumps({"issued": [{"customer": o.customer, "file": o.copy.model_path,
                                           "sha256": o.copy.model_sha256, "code": o.copy.code_index}
                                          for o in outcomes if o.ok],
                               "failed": [{"customer": o.customer, "error": o.error} for o in failed],
                               "already_issued": len(names) - len(todo)}, indent=2))
    else:
        for o in outcomes:
            if o.ok:
                click.echo(f"issued {o.customer}: {o.copy.model_path} (sha256 {o.copy.model_sha256[:16]}...)")
            else:
                click.echo(f"FAILED {o.customer}: {o.error}", err=True)
        click.echo(f"{len(outcomes) - len(failed)} issued, {len(failed)} failed, "
                   f"{len(names) - len(todo)} already had a copy")
    if failed:
        raise NNMarkError(f"{len(failed)} of {len(outcomes)} issues failed (first: {failed[0].error})")
    return 0


def _issue_blackbox(product_path: str, base: str | None, customers: str, code: str, steps: int | None,
                    lr: float | None, data: str | None, workers: int, key_file: str | None, key_seed: str | None,
                    capacity: int, colluders: int, noise: float, as_json: bool, method: str = "finetune",
                    delta: float = 0.25) -> int:
    from nnmark.blackbox.commands import create_product, issue_many
    from nnmark.blackbox.product import BlackBoxProduct, is_blackbox_product
    from nnmark.keys import Key

    root = Path(product_path)
    names = _customer_names(customers, None)
    if not is_blackbox_product(root):
        if (root / "product.json").exists():
            raise NNMarkError(f"{root} is a weight-fingerprint product; --code tardos:M makes a new black-box one")
        if base is None:
            raise NNMarkError(f"{product_path} is not a product yet: give --base to create it")
        key = Key.from_seed(key_seed) if key_seed is not None else Key.generate()
        prod = create_product(root, base, code, key, capacity=capacity, colluders=colluders, noise=noise, data=data,
                              steps=steps, lr=lr, alpha=None, method=method, delta=delta)
        click.echo(f"created black-box product {prod.config.name!r} in {root} ({method} copies, Tardos "
                   f"m={prod.config.m}, capacity "
                   f"{prod.config.capacity}, cutoff {prod.config.cutoff:.2g}, key {prod.config.key_id} in "
                   f"{root / 'key.json'}, mode 0600)", err=as_json)
    else:
        prod = BlackBoxProduct.open(root, key_file=key_file)
    known = {c.name for c in prod.registry.customers()}
    new = [n for n in names if n not in known]
    if new:
        prod.add_customers(new)
    prod.recover(older_than_s=0.0)
    todo = prod.pending_customers(names)
    outcomes = issue_many(root, todo, workers=workers, key_file=key_file)
    failed = [o for o in outcomes if o.error]
    if as_json:
        click.echo(json.dumps({"issued": [{"customer": o.customer, "file": o.file, "sha256": o.sha256, "code": o.code}
                                          for o in outcomes if not o.error],
                               "failed": [{"customer": o.customer, "error": o.error} for o in failed],
                               "already_issued": len(names) - len(todo)}, indent=2))
    else:
        for o in outcomes:
            if o.error:
                click.echo(f"FAILED {o.customer}: {o.error}", err=True)
            else:
                click.echo(f"issued {o.customer}: {o.file} (sha256 {(o.sha256 or '')[:16]}...)")
        click.echo(f"{len(outcomes) - len(failed)} issued, {len(failed)} failed, "
                   f"{len(names) - len(todo)} already had a copy")
    if failed:
        raise NNMarkError(f"{len(failed)} of {len(outcomes)} issues failed (first: {failed[0].error})")
    return 0


def _trace_blackbox(product_path: str, key_file: str | None, suspect: str | None, url: str | None, protocol: str,
                    model_name: str | None, budget: int | None, stop: str, timeout: float, as_json: bool,
                    answers: str = "auto") -> int:
    from nnmark.blackbox.commands import trace_report

    r = trace_report(product_path, key_file, suspect, url, protocol=protocol, model_name=model_name, budget=budget,
                     stop=stop, timeout=timeout, answers=answers)
    if as_json:
        click.echo(json.dumps(r, indent=2))
    else:
        click.echo(f"product {r['product']}: {r['status']} ({r['queries_used']} queries, looks {r['looks']}; "
                   f"answers read as {r.get('answers_read', 'labels')}, a/b/unusable {r['answers']['a']}/"
                   f"{r['answers']['b']}/{r['answers']['unusable']})")
        for v in r["named"]:
            click.echo(f"  NAMED {v['customer']}: code {v['code']}, p = {v['p_value']:.3g} (named after "
                       f"{v['queries']} queries, score {v['score']:.1f})")
        if not r["named"]:
            click.echo("  nobody is named")
        for v in r["suspects"][:3]:
            click.echo(f"  next lowest: code {v['code']} ({v['customer'] or 'unissued'}), p = {v['p_value']:.3g}")
        k = len(r["evidence"]["schedule"])
        click.echo(f"  level: named when p <= alpha / N = {r['alpha']:g} / {r['n_codes']} codes "
                   f"= {r['alpha'] / r['n_codes']:.3g} (p = min over the {k} looks of {k} x that look's p; "
                   f"per look {r['level']:.3g})")
        click.echo(f"  H0: {r['null_hypothesis']}")
        click.echo(f"  rule: {r['decision_rule']}")
    return 0 if r["named"] else 1


@fingerprint.command()
@click.argument("suspect", type=click.Path(dir_okay=False), required=False)
@click.option("--product", "product_path", required=True, type=click.Path(),
              help="product directory or its registry database")
@click.option("--key", "key_file", type=click.Path(dir_okay=False), default=None, help="product key file")
@click.option("--tau", default=None, type=float,
              help="use the paper's hard-threshold decoder at this threshold (default: the product's decoder)")
@click.option("--url", default=None, help="black-box products: trace the model behind this prediction API")
@click.option("--protocol", type=click.Choice(["nnmark", "oip", "tfserving"]), default="nnmark", show_default=True,
              help="the API's protocol (as for verify --url)")
@click.option("--model-name", default=None, help="the served model's name (oip, tfserving; or put it in the --url)")
@click.option("--budget", "--queries", "budget", default=None, type=int,
              help="black-box products: most trigger queries to ask (default: all of the code)")
@click.option("--stop", type=click.Choice(["first", "budget"]), default="first", show_default=True,
              help="black-box products: stop at the first look that names someone, or use the whole budget")
@click.option("--answers", type=click.Choice(["auto", "labels"]), default="auto", show_default=True,
              help="black-box products: auto reads class scores as soft answers where the API shows them "
                   "(its labels otherwise); labels reads arg-max labels only")
@click.option("--timeout", default=10.0, show_default=True, help="seconds per API request (overall deadline)")
@click.option("--json", "as_json", is_flag=True, help="print the full report as JSON")
def trace(suspect: str | None, product_path: str, key_file: str | None, tau: float | None, url: str | None,
          protocol: str, model_name: str | None, budget: int | None, stop: str, answers: str, timeout: float,
          as_json: bool) -> int:
    """Trace a suspect model: community shortlist, named colluders, evidence, p-values.

    A black-box (tardos:M) product traces a model file or, with --url, a prediction API through its trigger
    queries. Exit code 0 when customers are named, 1 when nobody is.
    """
    from nnmark.blackbox.product import is_blackbox_product

    if is_blackbox_product(product_path):
        return _trace_blackbox(product_path, key_file, suspect, url, protocol, model_name, budget, stop, timeout,
                               as_json, answers)
    if url is not None or suspect is None:
        raise NNMarkError("a weight-fingerprint product traces a model file (SUSPECT); --url needs a black-box "
                          "(tardos:M) product")
    from nnmark.fingerprint import Product

    prod = Product.open(product_path, key_file=key_file)
    report = prod.trace(suspect, tau=tau)
    if as_json:
        click.echo(report.to_json(indent=2))
    else:
        click.echo(f"product {report.product}: {report.status}")
        if report.verbatim_copy_of:
            click.echo(f"  the file is byte-identical to the copy issued to {report.verbatim_copy_of}")
        if report.community_shortlist:
            short = ", ".join(f"{s['customer']} (d={s['hamming']})" for s in report.community_shortlist[:10])
            click.echo(f"  community shortlist (a lead, not an accusation): {short}")
        for a in report.accused:
            comm = f", community {a.community}" if a.community else ""
            click.echo(f"  NAMED {a.customer}: code {a.code}{comm}, p = {a.p_value:.3g}")
        if report.ambiguous:
            click.echo(f"  suspects the code cannot separate (not accused): {', '.join(report.ambiguous)}")
        if not report.accused:
            click.echo("  nobody is named")
        m = report.evidence.get("coefficient_margins", [{}])[0]
        click.echo(f"  evidence: zero set {report.evidence['decoder'].get('zero_set_size', '-')} of the code's "
                   f"positions; max coefficient inside {m.get('max_coefficient_in_zero_set')}, min outside "
                   f"{m.get('min_coefficient_outside')} (tau {report.evidence['tau']})")
        click.echo(f"  H0: {report.null_hypothesis}")
        click.echo(f"  rule: {report.decision_rule}")
    return 0 if report.accused else 1
