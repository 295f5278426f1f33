#!/usr/bin/env bash
# Run a command against a local sandbox API on a free port, and stop the sandbox after,
# even when the command fails. The port is passed as SANDBOX_PORT (jobs/demo.yaml uses it).
#   scripts/with-sandbox.sh [SANDBOX OPTIONS...] -- COMMAND [ARGS...]
set -u
bin=${BIN:-.venv/bin}
sandbox_args=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do sandbox_args+=("$1"); shift; done
shift || true
[ $# -gt 0 ] || { echo "usage: $0 [sandbox options] -- command..." >&2; exit 2; }

out=$(mktemp)
"$bin/campaign" sandbox --port 0 "${sandbox_args[@]}" >"$out" 2>&1 &
pid=$!
cleanup() { kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; rm -f "$out"; }
trap cleanup EXIT INT TERM

for _ in $(seq 200); do
  grep -q "listening on" "$out" && break
  kill -0 "$pid" 2>/dev/null || { echo "the sandbox did not start:" >&2; cat "$out" >&2; exit 1; }
  sleep 0.05
done
port=$(sed -n 's|.*listening on http://[^:]*:\([0-9]*\).*|\1|p' "$out")
[ -n "$port" ] || { echo "the sandbox did not start in time:" >&2; cat "$out" >&2; exit 1; }
echo "sandbox on http://127.0.0.1:$port" >&2
SANDBOX_PORT=$port "$@"
