"""Host networks from the papers, built from a small JSON-able spec.

A spec is a plain dict, e.g. ``{"arch": "cnn", "in_shape": [1, 28, 28],
"num_classes": 10}``; optional keys override the preset's defaults. A model file
stores its spec, so loading a file rebuilds the exact network without code from
the file. Every network ends in a linear layer named ``head`` (the "last layer"
of the fine-tuning attacks); its other layers have stable names (``conv1``...,
``fc1``...) that schemes use to pick a layer. Specs from files are bounded
(:class:`SpecLimits`) and sized (:func:`spec_size`) before any network is built.
"""

from nnmark.models.zoo import (
    ARCHITECTURES,
    DEFAULT_LIMITS,
    SpecLimits,
    build_model,
    expected_state,
    head_of,
    model_spec,
    spec_size,
    validate_spec,
)

__all__ = ["ARCHITECTURES", "DEFAULT_LIMITS", "SpecLimits", "build_model", "expected_state", "head_of",
           "model_spec", "spec_size", "validate_spec"]
