#!/usr/bin/env bash
# Fuzzes a live cyrneld against openapi.json with schemathesis.
#
#   tests/fuzz/run.sh CYRNELD ST [MAX_EXAMPLES] [SEED]
#
# CYRNELD: the release daemon binary; ST: schemathesis' `st` command.
# Starts the daemon on a free loopback port with a temporary data directory
# and an API key, runs schemathesis with tests/fuzz/schemathesis.toml, then
# stops the daemon with SIGTERM (it kills what its processes started) and
# removes everything. Exits non-zero if schemathesis found anything (a 5xx,
# a response the document does not describe), if the daemon logged a panic,
# or if it did not stop cleanly.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
bin="${1:?usage: run.sh CYRNELD ST [MAX_EXAMPLES] [SEED]}"
st="${2:?usage: run.sh CYRNELD ST [MAX_EXAMPLES] [SEED]}"
max_examples="${3:-25}"
seed="${4:-1}"
spec="$root/openapi.json"

[ -x "$bin" ] || { echo "fuzz: no daemon binary at $bin" >&2; exit 2; }

work="$(mktemp -d "${TMPDIR:-/tmp}/cyrneld-fuzz.XXXXXX")"
mkdir -m 0700 "$work/data"
log="$work/cyrneld.log"
daemon=""
fuzzer=""

# Kills what is left of the daemon's children: every process whose working
# directory is inside $work (runs execute in <data_dir>/run/<id>/).
kill_leftovers() {
  local p cwd
  for p in /proc/[0-9]*; do
    cwd="$(readlink "$p/cwd" 2>/dev/null)" || continue
    case "$cwd" in "$work"/*) kill -KILL "${p#/proc/}" 2>/dev/null || true ;; esac
  done
}

# Stops the daemon: SIGTERM (it terminates every running process group and
# exits 0), SIGKILL after 30 s. Prints the exit status.
stop_daemon() {
  [ -n "$daemon" ] || return 0
  local pid="$daemon" i status=0
  daemon=""
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 300); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    echo "fuzz: cyrneld did not stop within 30 s of SIGTERM; killing it" >&2
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" || status=$?
  return "$status"
}

cleanup() {
  local rc=$?
  if [ -n "$fuzzer" ]; then
    kill -TERM "$fuzzer" 2>/dev/null || true
    wait "$fuzzer" 2>/dev/null || true
  fi
  stop_daemon || true
  kill_leftovers
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
key="$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"

# A clean environment: nothing from the caller's CYRNEL_* reaches the daemon.
# Short timeouts and grace: the fuzzer's processes run real (random) code.
# The create and run limits are off so that the budget exercises the API
# rather than 429s; kills are limited to 30 a minute, enough for the
# stateful phase to kill what it created and few enough that 429 answers and
# the rate-limit headers are checked too.
env -i PATH="$PATH" HOME="$work" \
  CYRNEL_API_KEY="$key" \
  CYRNEL_DEFAULT_TIMEOUT_MS=2000 \
  CYRNEL_KILL_GRACE_MS=200 \
  CYRNEL_MAX_OUTPUT_BYTES=1048576 \
  CYRNEL_EVENT_HEARTBEAT_MS=200 \
  CYRNEL_RATE_LIMIT_CREATE_PER_MIN=0 \
  CYRNEL_RATE_LIMIT_RUN_PER_MIN=0 \
  CYRNEL_RATE_LIMIT_KILL_PER_MIN=30 \
  CYRNEL_LOG_LEVEL=warn \
  "$bin" --listen "127.0.0.1:$port" --data-dir "$work/data" >"$log" 2>&1 &
daemon=$!

ready=""
for i in $(seq 300); do
  if ! kill -0 "$daemon" 2>/dev/null; then
    echo "fuzz: cyrneld exited during start-up:" >&2
    cat "$log" >&2
    daemon=""
    exit 1
  fi
  if python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1).read()' \
    "http://127.0.0.1:$port/health" >/dev/null 2>&1; then
    ready=1
    break
  fi
  sleep 0.1
done
[ -n "$ready" ] || { echo "fuzz: cyrneld did not answer /health within 30 s" >&2; cat "$log" >&2; exit 1; }

echo "fuzz: cyrneld on 127.0.0.1:$port, data in $work/data; schemathesis $("$st" --version | awk '{print $NF}'), $max_examples examples per operation, seed $seed"

report="$work/report.ndjson"
st_rc=0
# In the background, so that a signal to this script is handled at once
# (bash runs traps only between foreground commands).
CYRNEL_FUZZ_URL="http://127.0.0.1:$port" CYRNEL_FUZZ_KEY="$key" \
  SCHEMATHESIS_HOOKS=hooks PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" \
  "$st" --config-file "$here/schemathesis.toml" run "$spec" \
  --max-examples "$max_examples" --seed "$seed" --no-color \
  --report ndjson --report-ndjson-path "$report" &
fuzzer=$!
wait "$fuzzer" || st_rc=$?
fuzzer=""

# What was run, from schemathesis' own event log.
verdict="$work/verdict"
python3 - "$report" "$verdict" <<'EOF' || true
import json, sys
cases = 0
statuses = {}
failed = 0
def walk(node):
    # Check results anywhere in the recorder: {"name": ..., "status": "failure"}.
    global failed
    if isinstance(node, dict):
        if node.get("status") == "failure" and "name" in node:
            failed += 1
        for v in node.values():
            walk(v)
    elif isinstance(node, list):
        for v in node:
            walk(v)
for line in open(sys.argv[1], encoding="utf-8"):
    event = json.loads(line)
    for name, body in event.items():
        if name == "ScenarioFinished":
            recorder = body.get("recorder") or {}
            cases += len(recorder.get("cases", {}))
            for interaction in recorder.get("interactions", {}).values():
                resp = interaction.get("response") or {}
                code = resp.get("status_code")
                if code is not None:
                    statuses[code] = statuses.get(code, 0) + 1
            walk(recorder.get("checks", {}))
server_errors = sum(v for k, v in statuses.items() if int(k) >= 500)
print("fuzz: %d test cases, %d requests; statuses: %s; failed checks: %d; 5xx: %d" % (
    cases, sum(statuses.values()),
    ", ".join("%s x%d" % (k, v) for k, v in sorted(statuses.items())), failed, server_errors))
open(sys.argv[2], "w").write("%d %d %d\n" % (failed, server_errors, cases))
EOF

daemon_rc=0
stop_daemon || daemon_rc=$?
rc=0
read -r failed_checks server_errors cases < "$verdict" 2>/dev/null || { failed_checks=1; server_errors=0; cases=0; }
if [ "${cases:-0}" -eq 0 ]; then
  # A run that generated nothing (schemathesis crashed at start) proves
  # nothing: it is a failure, not a pass.
  echo "fuzz: FAILED: schemathesis generated no test case (exit $st_rc)" >&2
  rc=1
elif [ "$failed_checks" -ne 0 ] || [ "$server_errors" -ne 0 ]; then
  echo "fuzz: FAILED: $failed_checks failed checks, $server_errors 5xx responses (schemathesis exit $st_rc)" >&2
  rc=1
elif [ "$st_rc" -ne 0 ]; then
  # No check failed and no 5xx: what schemathesis reported is an error of
  # its own (e.g. a Hypothesis crash while generating), not a finding.
  echo "fuzz: warning: schemathesis exited $st_rc with internal errors only; no check failed, no 5xx" >&2
fi
if grep -q "panicked" "$log"; then
  echo "fuzz: FAILED: cyrneld panicked:" >&2
  grep -A5 "panicked" "$log" >&2
  rc=1
fi
if [ "$daemon_rc" -ne 0 ]; then
  echo "fuzz: FAILED: cyrneld exited with status $daemon_rc after SIGTERM; log:" >&2
  tail -50 "$log" >&2
  rc=1
fi
if [ "$rc" -eq 0 ]; then
  echo "fuzz: PASSED"
fi
exit "$rc"
