#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite, including the tests against the real local
# llama.cpp server. pytest's exit code 5 ("no tests ran") is a failure here too.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# A real PostgreSQL server for the instance-storage test (apt-get when missing; the test skips, saying
# why, if it cannot be had — unless MODEL_EVAL_REQUIRE_POSTGRES=1, as in CI).
./scripts/postgres_for_tests.sh >/dev/null || echo "PostgreSQL could not be installed: its test will be skipped" >&2
# Headless Chromium and ChromeDriver for the browser tests (report charts, the Dagster UI's asset
# page); they skip, saying why, without them — unless MODEL_EVAL_REQUIRE_BROWSER=1, as in CI.
./scripts/chromium_for_tests.sh >/dev/null || echo "Chromium could not be installed: the browser tests will be skipped" >&2
export LITELLM_LOCAL_MODEL_COST_MAP=True GX_ANALYTICS_ENABLED=false DAGSTER_DISABLE_TELEMETRY=1
set +e
.venv/bin/python -m pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: failing on purpose" >&2
  exit 1
fi
exit "$status"
