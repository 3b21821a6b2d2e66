#!/usr/bin/env bash
# Browser test of the web page: starts `capivara serve` on the tiny fixture
# model (fresh data dir, an API key, a free port), drives the page in headless
# Chromium with playwright-core (no browser download: Debian's `chromium`),
# and always stops the server. Exits non-zero when anything fails.
#
#   cargo build --release -p capivara
#   tests/browser/run.sh                                 # screenshot kept in a temp dir
#   SCREENSHOT=docs/screenshot.png tests/browser/run.sh  # refresh docs/screenshot.png
#
# Env: CAPIVARA_BIN (default target/release/capivara), CHROMIUM (default
# /usr/bin/chromium), SCREENSHOT (a path; relative = to the repository root).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
bin="${CAPIVARA_BIN:-$root/target/release/capivara}"
[[ "$bin" == /* ]] || bin="$PWD/$bin" # relative to where it was called from
export CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"

[[ -x "$bin" ]] || { echo "run.sh: no server binary at $bin (cargo build --release -p capivara)" >&2; exit 2; }
[[ -x "$CHROMIUM" ]] || { echo "run.sh: no Chromium at $CHROMIUM (apt-get install -y chromium)" >&2; exit 2; }

cd "$here"
if [[ ! -f node_modules/playwright-core/package.json ]]; then
  npm ci --no-audit --no-fund
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/capivara-browser.XXXXXX")"
server_pid=""
cleanup() {
  if [[ -n "$server_pid" ]] && kill -0 "$server_pid" 2>/dev/null; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port="$(node -e 'const s = require("net").createServer().listen(0, "127.0.0.1", () => { console.log(s.address().port); s.close(); })')"
export CAPIVARA_URL="http://127.0.0.1:$port"
export CAPIVARA_API_KEY="browser-test-$RANDOM$RANDOM"
export CAPIVARA_FIXTURES="$root/tests/fixtures/images"
if [[ -z "${SCREENSHOT:-}" ]]; then
  SCREENSHOT="$(mktemp -d "${TMPDIR:-/tmp}/capivara-screenshot.XXXXXX")/page.png"
elif [[ "$SCREENSHOT" != /* ]]; then
  SCREENSHOT="$root/$SCREENSHOT"
fi
export SCREENSHOT

# Two models (the same files under two names), for the model selector.
HF_HUB_OFFLINE=1 "$bin" serve --model "tiny=$root/tests/fixtures/tiny" --model "outro=$root/tests/fixtures/tiny" \
  --addr "127.0.0.1:$port" --data-dir "$work/data" --api-key "$CAPIVARA_API_KEY" \
  >"$work/server.log" 2>&1 &
server_pid=$!

ready=""
for _ in $(seq 1 300); do # up to 30 s
  if ! kill -0 "$server_pid" 2>/dev/null; then break; fi
  if node -e 'fetch(process.argv[1]).then(r => process.exit(r.ok ? 0 : 1), () => process.exit(1))' \
      "$CAPIVARA_URL/readyz" 2>/dev/null; then
    ready=1
    break
  fi
  sleep 0.1
done
if [[ -z "$ready" ]]; then
  echo "run.sh: the server did not become ready; its log:" >&2
  cat "$work/server.log" >&2
  exit 1
fi

status=0
node --test --test-reporter=spec page.test.mjs || status=$?
if [[ $status -ne 0 ]]; then
  echo "run.sh: browser test failed ($status); server log:" >&2
  tail -n 40 "$work/server.log" >&2
fi
exit "$status"
