#!/usr/bin/env bash
# The node-loss test, again and again, while another test run loads the machine: a flaky
# node-loss path shows here, not in CI (issue 18 asks for 20 passes of 20).
#
#   benchmarks/node_loss_loop.sh [RUNS] [LOAD_TESTS]
#
# RUNS (20) runs of tests/test_search_faults.py::test_node_lost_mid_trial_is_retried_elsewhere,
# one after another; beside them LOAD_TESTS (tests/test_search.py) runs over and over in its own
# pytest, stopped by its pid at the end. Prints one line per run and the count of passes; exits
# non-zero unless every run passed. Logs: ${TMPDIR:-/tmp}/kdsearch-node-loss-loop/.
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-20}"
load_tests="${2:-tests/test_search.py}"
py=".venv/bin/python"
logs="${TMPDIR:-/tmp}/kdsearch-node-loss-loop"
mkdir -p "$logs"

# The load: the other test run, repeated until stopped; its own session, so every process it
# starts (Ray's included) is stopped with it.
setsid bash -c "while true; do $py -m pytest -q -p no:cacheprovider $load_tests >>'$logs/load.log' 2>&1 || true; done" &
load=$!
stop_load() {
  kill -TERM -- "-$load" 2>/dev/null || true
  sleep 2
  kill -KILL -- "-$load" 2>/dev/null || true
}
trap stop_load EXIT

passed=0
for ((i = 1; i <= runs; i++)); do
  start=$SECONDS
  if "$py" -m pytest -q -p no:cacheprovider \
    "tests/test_search_faults.py::test_node_lost_mid_trial_is_retried_elsewhere" >"$logs/run-$i.log" 2>&1; then
    passed=$((passed + 1))
    echo "run $i: passed in $((SECONDS - start)) s"
  else
    echo "run $i: FAILED in $((SECONDS - start)) s (log: $logs/run-$i.log)"
  fi
done
echo "$passed of $runs passed"
((passed == runs))
