"""Watermark and fingerprint schemes, one module each, on the protocol of
:mod:`nnmark.schemes.base`."""

from nnmark.schemes.base import SCHEMES, Scheme, load_scheme, register_scheme

__all__ = ["SCHEMES", "Scheme", "load_scheme", "register_scheme"]

from nnmark.schemes.trigger_set import TriggerSetWatermark  # noqa: E402  (registers "trigger")

__all__ += ["TriggerSetWatermark"]
from nnmark.schemes.projection import ProjectionRegularizer  # noqa: E402  (registers "projection")
from nnmark.schemes.uchida import Uchida  # noqa: E402  (registers "uchida")
from nnmark.schemes.wang import WangAuto, WangManu  # noqa: E402  (registers "wang-auto", "wang-manu")

__all__ += ["Uchida", "ProjectionRegularizer", "WangAuto", "WangManu"]
