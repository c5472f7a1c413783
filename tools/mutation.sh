#!/usr/bin/env bash
# Mutation testing of one module with its own tests: tools/mutation.sh MODULE [TESTS...]
# (docs/testing.md). Uses the python on PATH (activate the project's venv first); installs
# pyproject's `mutation` extra (mutmut) when it is missing.
set -euo pipefail
exec python "$(cd "$(dirname "$0")" && pwd)/mutation.py" "$@"
