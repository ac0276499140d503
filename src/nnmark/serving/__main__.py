"""``python -m nnmark.serving MODEL [--host H] [--port P] [--max-batch B] [--protocol nnmark|oip] [--verbose]``."""

from __future__ import annotations

import os
import sys

import click

from nnmark.errors import NNMarkError
from nnmark.serving.server import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_REQUEST_TIMEOUT_S,
    serve_model_file,
)


@click.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=str))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535),
              help="TCP port (0: pick a free one; the ready line shows it).")
@click.option("--max-batch", default=DEFAULT_MAX_BATCH, show_default=True, type=click.IntRange(1, 100_000),
              help="Most images per request (larger batches get HTTP 413).")
@click.option("--max-body", default=None, type=click.IntRange(1), help="Most request body bytes "
              "[default: about max-batch x C*H*W x 32].")
@click.option("--threads", default=None, type=click.IntRange(1, 256), help="Torch threads [default: min(4, cores)].")
@click.option("--protocol", type=click.Choice(["nnmark", "oip"]), default="nnmark", show_default=True,
              help="oip: also serve the Open Inference Protocol (KServe v2) for the model named after the file.")
@click.option("--request-timeout", default=DEFAULT_REQUEST_TIMEOUT_S, show_default=True,
              type=click.FloatRange(min=0.01), help="Seconds a request's head and body may take to arrive "
              "(slower clients get 408 and are dropped).")
@click.option("--max-connections", default=DEFAULT_MAX_CONNECTIONS, show_default=True, type=click.IntRange(1),
              help="Connections held at once (at the limit the one waiting longest for its request is dropped).")
@click.option("--verbose", "-v", is_flag=True, help="Log every request to stderr.")
def main(model: str, host: str, port: int, max_batch: int, max_body: int | None, threads: int | None,
         request_timeout: float, max_connections: int,
         protocol: str, verbose: bool) -> None:
    """Serve MODEL (an nnmark .safetensors file) over HTTP: GET /health, POST /predict."""
    try:
        serve_model_file(model, host=host, port=port, max_batch=max_batch, verbose=verbose,
                         request_timeout=request_timeout, max_connections=max_connections,
                         max_body=max_body, threads=threads, protocol=protocol)
    except NNMarkError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except OSError as exc:  # e.g. the model file is unreadable
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except Exception as exc:  # noqa: BLE001 - a bug: one line, never a traceback (NNMARK_DEBUG=1 shows it)
        if os.environ.get("NNMARK_DEBUG"):
            raise
        click.echo(f"error: internal {type(exc).__name__}: {' '.join(str(exc).split())[:300]}", err=True)
        sys.exit(3)


if __name__ == "__main__":
    main(prog_name="python -m nnmark.serving")
