#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the whole test suite: ruff, mypy, pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/test-services.sh
echo "== ruff"
.venv/bin/ruff check kms hsm tests bench
echo "== mypy"
.venv/bin/mypy kms hsm
echo "== pytest"
.venv/bin/python -m pytest -q "$@"
