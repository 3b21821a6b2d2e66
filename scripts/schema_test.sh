#!/usr/bin/env bash
# Schema tests: schemathesis (PyPI) against /openapi.json of `capivara serve`
# on the tiny fixture model, with the API key so that writes are exercised.
# Every response must match the spec (status, content type, headers, body
# schema), schema-invalid requests must be refused, and nothing may answer
# 5xx other than 503 (nothing does: the run fails on any 500). The check
# `positive_data_acceptance` is left out: the spec cannot say everything the
# server refuses (an image that does not decode, `metadata` before its
# `image` in a form, a query and an image at once), so some schema-valid
# requests rightly get 400.
#
#   CAPIVARA_BIN=target/debug/capivara scripts/schema_test.sh
# Env: SCHEMA_EXAMPLES (default 50 per operation), SCHEMA_SEED (1),
# SCHEMA_VENV (target/schema-venv: created with pip if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${CAPIVARA_BIN:-target/debug/capivara}
venv=$(realpath -m "${SCHEMA_VENV:-target/schema-venv}")
if [ ! -x "$venv/bin/schemathesis" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q -r scripts/requirements-schema.txt
fi
data=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
HF_HUB_OFFLINE=1 RUST_LOG=warn "$bin" serve --model tests/fixtures/tiny \
    --addr "127.0.0.1:$port" --data-dir "$data" --api-key schema-key 2>"$data.log" &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$data" "$data.log"' EXIT
url="http://127.0.0.1:$port"
for _ in $(seq 300); do
    python3 - "$url" <<'PY' && break
import sys, urllib.request
try:
    sys.exit(0 if urllib.request.urlopen(sys.argv[1] + "/readyz", timeout=1).status == 200 else 1)
except Exception:
    sys.exit(1)
PY
    kill -0 $pid 2>/dev/null || { cat "$data.log"; echo "the server exited" >&2; exit 1; }
    sleep 0.2
done
# (run from a scratch directory: schemathesis keeps a cache where it runs)
(cd "$data" && "$venv/bin/schemathesis" run "$url/openapi.json" \
    --checks all --exclude-checks positive_data_acceptance \
    -H "Authorization: Bearer schema-key" \
    --max-examples "${SCHEMA_EXAMPLES:-50}" --seed "${SCHEMA_SEED:-1}" \
    --workers 2 --no-color)
# The server is still up and serving.
kill -0 $pid
python3 -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('$url/healthz').status == 200 else 1)"
echo "schema tests: passed; the server is still serving"
