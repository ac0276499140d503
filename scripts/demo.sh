#!/usr/bin/env bash
# One command on a fresh machine: set up .venv, then run the end-to-end demo
# (embed a trigger-set watermark, attack the model, verify ownership over HTTP).
# Extra arguments go to `nnmark demo` (e.g. --json, --dataset digits).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
exec .venv/bin/nnmark demo "$@"
