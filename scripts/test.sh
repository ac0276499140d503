#!/usr/bin/env bash
# One command on a fresh machine: set up .venv, lint, then run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
bash scripts/system-deps.sh
.venv/bin/ruff check src tests benchmarks experiments
exec .venv/bin/python -m pytest -q --durations=25 -n 2 --dist loadgroup "$@"
