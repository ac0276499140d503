"""Per-customer fingerprints (SecureMark-DL): issuing fingerprinted copies and tracing leaked ones.

- :mod:`nnmark.fingerprint.carrier` -- the projection-regulariser carrier of ``F`` in one or more layers.
- :mod:`nnmark.fingerprint.issue` -- :func:`issue_copy`: fine-tune + closed-form correction of the base model.
- :mod:`nnmark.fingerprint.product` -- :class:`Product`: base model, key, codes, registry; issue and trace.
- :mod:`nnmark.fingerprint.engines` -- :func:`issue_many` over a local process pool or Ray.
"""

from nnmark.fingerprint.carrier import FingerprintCarrier, FingerprintError, plan_chunks
from nnmark.fingerprint.engines import ENGINES, IssueOutcome, issue_many
from nnmark.fingerprint.issue import IssueConfig, IssueRecord, issue_copy
from nnmark.fingerprint.product import (
    DECISION_RULE,
    Accusation,
    Product,
    ProductConfig,
    TraceReport,
    build_layout,
    parse_code,
)

__all__ = [
    "DECISION_RULE",
    "ENGINES",
    "Accusation",
    "FingerprintCarrier",
    "FingerprintError",
    "IssueConfig",
    "IssueOutcome",
    "IssueRecord",
    "Product",
    "ProductConfig",
    "TraceReport",
    "build_layout",
    "issue_copy",
    "issue_many",
    "parse_code",
    "plan_chunks",
]
