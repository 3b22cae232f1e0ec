#!/usr/bin/env bash
# Quick start, command 2 (and CI): set up, start real Redis / Kafka / Prometheus on
# 127.0.0.1 with the repo's scripts, lint, run every test (integration and slow
# included), stop the services. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/install_system.sh
trap 'bash scripts/services.sh stop all >/dev/null 2>&1 || true' EXIT
for svc in redis kafka prometheus; do
  bash scripts/services.sh start "$svc"
done
export CODISTILL_TEST_REDIS_URL=$(cat .services/redis.address)
export CODISTILL_TEST_KAFKA=$(cat .services/kafka.address)
export CODISTILL_TEST_PROMETHEUS=$(cat .services/prometheus.address)
.venv/bin/ruff check .
.venv/bin/lint-imports --no-cache
.venv/bin/python -m pytest -q --durations=25 "$@"
