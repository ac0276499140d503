"""Combined evidence: copies that carry both the weight fingerprint and the black-box code, traced both ways.

    both = issue_combined(weights, blackbox, "alice")     # weights: nnmark.fingerprint.Product, same base file
    rep = trace_combined(weights, blackbox, model=leaked)  # or oracle=HTTPOracle(url) when only the API is seen

Issuing (the cheapest path the two products allow): the weight-fingerprint product issues the customer's copy as
usual (its registry records that file); the black-box product then fine-tunes *that* copy, instead of the base,
to answer the triggers by the customer's Tardos codeword, and its registry records the result -- the file the
customer receives. Both products must have been created from the same base model file (same SHA-256). The
black-box fine-tune moves every weight a little; the weight tracer is built to survive fine-tuning, and what it
still reads after it is measured (``tests/test_blackbox_product.py``, ``experiments/blackbox/combined.py``).

Tracing: a suspect whose weights are available is traced by both products; one seen only through its API is
traced by the black-box product alone (the weight verdict is then absent). The report gives the two verdicts
side by side and whether they name the same customers. Each verdict keeps its own guarantee
(P[any innocent named] <= alpha of that product); a customer named by *either* is named at family-wise level at
most ``alpha_weights + alpha_blackbox`` (union bound), by *both* at most ``min`` of the two.

Per customer the report also gives ``p_combined = min(1, 2 min(p_weights, p_blackbox))``, the Bonferroni
combination of the two per-customer p-values: both are valid under the same H0_u ("u's copy was not used"),
whatever their dependence, so ``p_combined`` is a valid p-value for H0_u. A p-value a tracer did not report
(not small enough to be listed) is taken as 1, which can only make ``p_combined`` larger (conservative). The
combined rule names ``u`` when ``p_combined <= alpha / N`` with ``N = min`` of the two capacities (a customer
with a combined copy holds a code in both registries, so at most ``N`` customers are tested): P[any innocent
named by the combined rule] <= alpha. No other combination (e.g. Fisher's, which needs independence) is made.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from nnmark.blackbox.product import BlackBoxError, BlackBoxProduct
from nnmark.io import load_model
from nnmark.registry import IssuedCopy

COMBINED_RULE = (
    "p_combined(u) = min(1, 2 min(p_weights(u), p_blackbox(u))) (Bonferroni; unreported p taken as 1); u is named "
    "by the combined rule when p_combined(u) <= alpha / N, N the smaller capacity of the two products: "
    "P[any innocent named] <= alpha whatever the dependence of the two tests")


@dataclass(frozen=True)
class CombinedIssue:
    """A customer's combined copy: ``weights`` (the weight-fingerprinted intermediate file, in the weight
    product's registry) and ``blackbox`` (the delivered file, fine-tuned from it, in the black-box registry)."""

    customer: str
    weights: IssuedCopy
    blackbox: IssuedCopy

    @property
    def model_path(self) -> str:
        """The file the customer receives."""
        return self.blackbox.model_path


def _check_pair(weights: Any, blackbox: BlackBoxProduct) -> None:
    if weights.config.base_sha256 != blackbox.config.base_sha256:
        raise BlackBoxError("the weight-fingerprint and black-box products were made from different base models")


def issue_combined(weights: Any, blackbox: BlackBoxProduct, customer: str,
                   out: str | Path | None = None) -> CombinedIssue:
    """Issue ``customer`` one copy carrying both fingerprints (module doc). ``weights``: a
    :class:`nnmark.fingerprint.Product`; the customer must be registered in both products. ``out``: the delivered
    file (default: under the black-box product's ``copies/``)."""
    _check_pair(weights, blackbox)
    w = weights.issue(customer)
    start, _ = load_model(w.model_path, expect_spec=blackbox.config.spec)
    return CombinedIssue(customer, w, blackbox.issue(customer, out=out, start=start))


@dataclass
class CombinedReport:
    """Both verdicts on one suspect (JSON-able via :meth:`to_dict`).

    ``blackbox`` / ``weights``: each tracer's ``status``, ``named`` customers, ``level`` (its per-customer gate)
    and ``alpha``; ``weights`` is ``None`` when only the API was available. ``agree``: both tracers ran and name
    the same set of customers. ``customers``: per customer with any reported p-value, ``p_blackbox``,
    ``p_weights`` (``None``: not reported), ``p_combined`` and ``named_combined`` (:data:`COMBINED_RULE`)."""

    blackbox: dict[str, Any]
    weights: dict[str, Any] | None
    agree: bool | None
    named_either: list[str]
    named_both: list[str]
    customers: dict[str, dict[str, Any]]
    combined_level: float
    combined_rule: str = COMBINED_RULE
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def trace_combined(weights: Any, blackbox: BlackBoxProduct, *, model: nn.Module | None = None,
                   oracle: Any = None, budget: int | None = None, stop: str = "budget") -> CombinedReport:
    """Trace one suspect both ways (module doc): ``model`` (its weights; the black-box trace then asks it the
    trigger queries locally, reading its probabilities, unless ``oracle`` is given) and/or ``oracle`` (its
    prediction API only; soft answers where it returns score rows)."""
    from nnmark.blackbox.answers import ProbabilityOracle

    _check_pair(weights, blackbox)
    if model is None and oracle is None:
        raise BlackBoxError("give the suspect's model, its oracle, or both")
    bb = blackbox.trace(oracle if oracle is not None else ProbabilityOracle(model), budget=budget, stop=stop,
                        top=blackbox.config.capacity)  # every code's p-value is listed, so every holder's
    bb_p = {v.customer: v.p_value for v in [*bb.named, *bb.suspects] if v.customer is not None}
    # the black-box verdict's p-value is already adjusted for its K looks: named <=> p <= alpha / N
    bb_side = {"status": bb.status, "named": sorted(bb.named_customers), "level": bb.alpha / bb.n_codes,
               "alpha": bb.alpha, "queries_used": bb.queries_used, "capacity": bb.n_codes,
               "answers_read": bb.answers_read}
    w_side, w_p = None, {}
    if model is not None:
        wr = weights.trace(model)
        w_p = {a.customer: a.p_value for a in wr.accused}
        w_p.update({s["customer"]: s["p_value"] for s in wr.suspects if s.get("p_value") is not None})
        w_side = {"status": wr.status, "named": sorted(wr.named), "level": wr.evidence["p_value_level"],
                  "alpha": weights.config.alpha, "capacity": weights.layout.n_codes}
    n = min(blackbox.config.capacity, w_side["capacity"] if w_side else weights.layout.n_codes)
    level = min(blackbox.config.alpha, weights.config.alpha) / n
    customers = {}
    for name in sorted(set(bb_p) | set(w_p)):
        pb, pw = bb_p.get(name), w_p.get(name)
        pc = min(1.0, 2 * min(1.0 if pb is None else pb, 1.0 if pw is None else pw))
        customers[name] = {"p_blackbox": pb, "p_weights": pw, "p_combined": pc, "named_combined": pc <= level}
    named_bb = set(bb_side["named"])
    named_w = set(w_side["named"]) if w_side else set()
    return CombinedReport(bb_side, w_side, (named_bb == named_w) if w_side else None, sorted(named_bb | named_w),
                          sorted(named_bb & named_w) if w_side else [], customers, level,
                          evidence={"blackbox_null": bb.null_hypothesis, "blackbox_rule": bb.decision_rule})
