#!/usr/bin/env bash
# Set up (if needed) and evaluate every enabled model on every task: `./scripts/run.sh [--models A,B] [--tasks T]`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export LITELLM_LOCAL_MODEL_COST_MAP=True GX_ANALYTICS_ENABLED=false DAGSTER_DISABLE_TELEMETRY=1
exec .venv/bin/model-eval run "$@"
