#!/usr/bin/env bash
# Record the dependency versions the test suite runs with: constraints.txt, used by the Docker image,
# the production install and CI (pip install -c constraints.txt ...). Run after changing a dependency
# in pyproject.toml, then run the whole suite in a venv installed with the new file.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d)
trap 'rm -rf "$venv"' EXIT
python3 -m venv "$venv"
"$venv/bin/pip" install -q -e ".[test]"
{
  echo "# The versions of every dependency the test suite ran with (pip freeze of the test environment,"
  echo "# without this project): pip install -c constraints.txt . — regenerate with scripts/freeze-constraints.sh"
  "$venv/bin/pip" freeze --exclude-editable | grep -vi '^crc-cds-service'
} > constraints.txt
echo "constraints.txt: $(grep -vc '^#' constraints.txt) pinned packages"
