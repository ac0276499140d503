"""Black-box traitor tracing: name the customers behind a leaked model from its prediction API alone.

- :mod:`nnmark.codes.tardos` -- the Tardos code (arcsine biases with a cutoff, symmetric accusation score).
- :mod:`nnmark.blackbox.triggers` -- keyed in-distribution trigger queries, two keyed labels each.
- :mod:`nnmark.blackbox.issue` -- a customer's copy: a short fine-tune that answers the triggers by its codeword.
- :mod:`nnmark.blackbox.tilt` -- or a closed-form tilt of the output layer (no training; exact under averaging).
- :mod:`nnmark.blackbox.null` -- the exact null distribution of a score and its p-value.
- :mod:`nnmark.blackbox.trace` -- tracing through an oracle with a query budget and sequential looks.
- :mod:`nnmark.blackbox.product` -- :class:`BlackBoxProduct`: key, code, triggers, registry; issue and trace.
"""

from nnmark.blackbox.issue import BlackBoxIssueConfig, BlackBoxIssueRecord, issue_blackbox_copy
from nnmark.blackbox.null import NULL_HYPOTHESIS, ScoreNull
from nnmark.blackbox.product import BlackBoxConfig, BlackBoxError, BlackBoxProduct, is_blackbox_product
from nnmark.blackbox.trace import DECISION_RULE, BlackBoxTraceReport, CustomerVerdict, look_schedule, trace_oracle
from nnmark.blackbox.triggers import TriggerSet, make_triggers

__all__ = [
    "DECISION_RULE",
    "NULL_HYPOTHESIS",
    "BlackBoxConfig",
    "BlackBoxError",
    "BlackBoxIssueConfig",
    "BlackBoxIssueRecord",
    "BlackBoxProduct",
    "BlackBoxTraceReport",
    "CustomerVerdict",
    "ScoreNull",
    "TriggerSet",
    "issue_blackbox_copy",
    "is_blackbox_product",
    "look_schedule",
    "make_triggers",
    "trace_oracle",
]
