"""Serving a model over HTTP and querying one: black-box verification through an API.

- :func:`~nnmark.serving.server.serve_model_file` / :func:`~nnmark.serving.server.make_server`:
  a bounded, threaded JSON prediction server (``GET /health``, ``POST /predict``);
- :class:`~nnmark.serving.client.HTTPOracle`: an oracle with a query budget, timeouts and retries,
  speaking nnmark's ``/predict``, the Open Inference Protocol (KServe v2: Triton, KServe, MLServer)
  or TF-Serving's REST API;
- :mod:`~nnmark.serving.protocols`: those wire formats (binary OIP tensors included) as pure functions.

Run a server with ``nnmark serve MODEL --port P [--protocol oip]`` or ``python -m nnmark.serving MODEL --port P``.
"""

from nnmark.serving.client import HTTPOracle
from nnmark.serving.server import PredictionServer, ServeError, make_server, serve_model_file

__all__ = ["HTTPOracle", "PredictionServer", "ServeError", "make_server", "serve_model_file"]
