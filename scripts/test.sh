#!/usr/bin/env bash
# Run the test suite (after scripts/setup.sh). Extra arguments go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
workers=${EDGEKIT_TEST_WORKERS:-2}
.venv/bin/python -m pytest -n "$workers" --durations=15 "$@"
rc=$?
if [ $rc -eq 5 ]; then
    echo "test: pytest collected no tests (exit 5): the test paths or filters are wrong" >&2
    exit 1
fi
exit $rc
