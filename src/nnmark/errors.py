"""Exceptions raised for bad input.

Every error a user can cause (a corrupt model file, a key made for another scheme,
an unreachable endpoint, ...) is an :class:`NNMarkError` whose message is one
readable line; the command line prints that line and exits non-zero instead of
showing a traceback.
"""


class NNMarkError(Exception):
    """Base class of all user-facing nnmark errors (message: one line)."""


class ModelFileError(NNMarkError):
    """A model file is missing, corrupt, unsafe (e.g. a pickle) or does not match its spec."""


class KeyFileError(NNMarkError):
    """A key file is missing, malformed, or made for another scheme / model."""


class DataError(NNMarkError):
    """A dataset is unknown, missing on disk, or not in the expected format."""


class OracleError(NNMarkError):
    """A remote model (prediction API) is unreachable, slow, or answers malformed data."""


class SchemeError(NNMarkError):
    """A scheme was configured inconsistently (e.g. a layer too small for the message)."""
