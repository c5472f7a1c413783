#!/usr/bin/env bash
# Mutation testing of one module with its own tests: tools/mutation.sh MODULE [TESTS...]
# (docs/testing.md). Uses the python on PATH (activate the project's venv first); installs
# pyproject's `mutation` extra (mutmut) when it is missing.
set -euo pipefail
if ! python -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "tools/mutation.sh: needs Python >= 3.11 (tomllib; mutmut 3), found $(python -V 2>&1)" >&2
    exit 2
fi
exec python "$(cd "$(dirname "$0")" && pwd)/mutation.py" "$@"
