"""Bounded JSON reading for every document that comes from outside the process.

Model metadata, safetensors headers, HTTP request bodies (server), HTTP answers
(client), key files and product configurations are all read with :func:`loads`,
which refuses, with a one-line :class:`JSONLimitError`:

- a document larger than ``max_bytes`` (checked before decoding);
- nesting deeper than ``max_depth`` arrays/objects (default 64; nnmark's own
  documents nest at most 6 levels). The standard decoder recurses once per level
  and ends in a ``RecursionError`` near 1,000 levels; here that is caught, and
  every shallower document is measured with an explicit stack after parsing, so
  that no later code (``json.dumps``, ``copy.deepcopy``) recurses on it either;
- invalid UTF-8 or JSON, and (``allow_constants=False``) ``NaN`` / ``Infinity``.

Integers longer than Python's ``sys.get_int_max_str_digits()`` (4,300 digits)
are refused by the decoder itself, so no input costs quadratic time.
"""

from __future__ import annotations

import json
from typing import Any

DEFAULT_MAX_DEPTH = 64
DEFAULT_MAX_BYTES = 16 << 20  # 16 MiB


class JSONLimitError(ValueError):
    """A JSON document is too large, too deeply nested, or not valid JSON (message: one line)."""


def _no_constants(name: str) -> float:
    raise JSONLimitError(f"non-finite number {name} is not allowed")


def loads(data: bytes | bytearray | memoryview | str, *, max_depth: int = DEFAULT_MAX_DEPTH,
          max_bytes: int = DEFAULT_MAX_BYTES, allow_constants: bool = True, what: str = "JSON") -> Any:
    """Parse ``data`` (UTF-8 bytes or text) with size and depth bounds.

    ``max_depth``: most nested arrays/objects (a scalar has depth 0, ``[]`` depth 1).
    ``max_bytes``: most bytes (for text: UTF-8 bytes, checked on the length first).
    ``allow_constants``: accept ``NaN``, ``Infinity``, ``-Infinity`` (Python's
    default); ``False`` refuses them. ``what``: names the document in messages
    (e.g. ``"model metadata"``). Raises :class:`JSONLimitError`.
    """
    if isinstance(data, str):
        size = len(data)  # a lower bound of its UTF-8 size: cheap first check
        if size > max_bytes or len(data.encode("utf-8", "surrogatepass")) > max_bytes:
            raise JSONLimitError(f"{what} is larger than {max_bytes} bytes")
        text = data
    else:
        if len(data) > max_bytes:
            raise JSONLimitError(f"{what} is larger than {max_bytes} bytes ({len(data)} bytes)")
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            raise JSONLimitError(f"{what} is not valid UTF-8") from None
    try:
        if allow_constants:
            obj = json.loads(text)
        else:
            obj = json.loads(text, parse_constant=_no_constants)
    except RecursionError:
        raise JSONLimitError(f"{what} is nested deeper than {max_depth} levels") from None
    except JSONLimitError as exc:
        raise JSONLimitError(f"{what}: {exc}") from None
    except ValueError as exc:  # JSONDecodeError; integers beyond the digit limit
        raise JSONLimitError(f"{what} is not valid JSON: {_one_line(exc)}") from None
    if depth_exceeds(obj, max_depth):
        raise JSONLimitError(f"{what} is nested deeper than {max_depth} levels")
    return obj


def depth_exceeds(obj: Any, max_depth: int) -> bool:
    """True when ``obj`` (parsed JSON: dicts, lists, scalars) nests deeper than ``max_depth``.

    Iterative (no recursion), linear in the number of values.
    """
    if not isinstance(obj, (list, dict)):
        return False
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > max_depth:
            return True
        for child in (node.values() if isinstance(node, dict) else node):
            if isinstance(child, (list, dict)):
                stack.append((child, depth + 1))
    return False


def _one_line(exc: BaseException, limit: int = 120) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
