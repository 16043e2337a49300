#!/usr/bin/env bash
# Installs the test upstream FHIR server's npm dependencies (idempotent).
# Skips `npm ci` when node_modules matches package-lock.json (stamp file).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

command -v node >/dev/null || { echo "install.sh: node is not installed" >&2; exit 1; }
command -v npm >/dev/null || { echo "install.sh: npm is not installed" >&2; exit 1; }

stamp=node_modules/.fhircrypt-install-stamp
want="$( { cat package.json package-lock.json; node --version; } | sha256sum | cut -d' ' -f1)"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

# Serialise concurrent installs (e.g. parallel test workers).
exec 9>.install.lock
if command -v flock >/dev/null; then
  flock 9
fi
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

npm ci --no-audit --no-fund --loglevel=error >&2
echo "$want" > "$stamp"
