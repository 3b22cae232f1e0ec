#!/usr/bin/env bash
# The local stack without Docker: the twin of docker-compose.yml, on 127.0.0.1.
#
#   scripts/stack.sh up        Redis, Kafka, Prometheus (with deploy/prometheus/rules), then
#                              prepare (data, teacher vectors, student, bundle, topics),
#                              server, labeller, trainer, watcher and traffic; prints the URLs
#   scripts/stack.sh down      stops everything it started (apps, then services)
#   scripts/stack.sh status    what runs, with pids and URLs
#   scripts/stack.sh env       the CODISTILL_* settings every app process gets
#   scripts/stack.sh commands  each app service's command (docker-compose.yml runs the same)
#
# Ports (env overrides): CODISTILL_STACK_REDIS_PORT 6379, _KAFKA_PORT 9092,
# _KAFKA_CONTROLLER_PORT 9093, _PROMETHEUS_PORT 9090, _SERVER_PORT 8000,
# _TRAINER_PORT 9100, _WATCHER_PORT 9101, _LABELLER_PORT 9102. CODISTILL_STACK_SIZE (small) is the data
# size, CODISTILL_STACK_STATE (<repo>/.stack) holds pids, logs and the services'
# state, CODISTILL_STACK_HOME (<state>/home) the artifacts. Logs: <state>/logs/.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE=${CODISTILL_STACK_STATE:-$ROOT/.stack}
LOGS=$STATE/logs
TIMEOUT=${CODISTILL_STACK_TIMEOUT:-180}
REDIS_PORT=${CODISTILL_STACK_REDIS_PORT:-6379}
KAFKA_PORT=${CODISTILL_STACK_KAFKA_PORT:-9092}
KAFKA_CONTROLLER_PORT=${CODISTILL_STACK_KAFKA_CONTROLLER_PORT:-9093}
PROMETHEUS_PORT=${CODISTILL_STACK_PROMETHEUS_PORT:-9090}
SERVER_PORT=${CODISTILL_STACK_SERVER_PORT:-8000}
TRAINER_PORT=${CODISTILL_STACK_TRAINER_PORT:-9100}
WATCHER_PORT=${CODISTILL_STACK_WATCHER_PORT:-9101}
LABELLER_PORT=${CODISTILL_STACK_LABELLER_PORT:-9102}
APP_HOME=${CODISTILL_STACK_HOME:-$STATE/home}
APPS=(server labeller trainer watcher traffic)  # long-running, started in this order

log() { echo "stack.sh: $*" >&2; }

# One table, two readers: this script runs these, tests/test_compose.py checks that
# docker-compose.yml runs exactly the same (differences are environment only).
app_commands() {
    cat <<'CMDS'
prepare	codistill stack prepare
server	codistill serve
labeller	codistill teacher label --follow
trainer	codistill student online --init-student current --lr 1e-4 --max-batch-wait-s 2 --publish-every 200
watcher	codistill serve-watch
traffic	codistill traffic
CMDS
}

app_argv() { app_commands | awk -F '\t' -v n="$1" '$1 == n { print $2 }'; }

# What every app process gets; docker-compose.yml sets the same keys with its hosts.
app_env() {
    cat <<EOF
CODISTILL_HOME=$APP_HOME
CODISTILL_DATA__SIZE=${CODISTILL_STACK_SIZE:-small}
CODISTILL_STORE__BACKEND=redis
CODISTILL_STORE__REDIS_URL=redis://127.0.0.1:$REDIS_PORT/0
CODISTILL_STREAM__BACKEND=kafka
CODISTILL_STREAM__BOOTSTRAP_SERVERS=127.0.0.1:$KAFKA_PORT
CODISTILL_SERVING__PORT=$SERVER_PORT
CODISTILL_SERVING__ADMIN_API_KEY=${CODISTILL_SERVING__ADMIN_API_KEY:-codistill-local-admin}
CODISTILL_ONLINE__METRICS_PORT=$TRAINER_PORT
CODISTILL_ONLINE__LABELLER=true
CODISTILL_LABELLER__METRICS_PORT=$LABELLER_PORT
CODISTILL_WATCHER__METRICS_PORT=$WATCHER_PORT
CODISTILL_WATCHER__SERVER_URL=http://127.0.0.1:$SERVER_PORT
CODISTILL_TRAFFIC__SERVER_URL=http://127.0.0.1:$SERVER_PORT
HF_HUB_OFFLINE=1
EOF
}

services() {
    CODISTILL_SERVICES_STATE=$STATE/services CODISTILL_REDIS_PORT=$REDIS_PORT \
        CODISTILL_KAFKA_PORT=$KAFKA_PORT CODISTILL_KAFKA_CONTROLLER_PORT=$KAFKA_CONTROLLER_PORT \
        CODISTILL_PROMETHEUS_PORT=$PROMETHEUS_PORT \
        CODISTILL_PROMETHEUS_RULES=$ROOT/deploy/prometheus/rules \
        bash "$ROOT/scripts/services.sh" "$@"
}

pid_of() { [[ -s $STATE/$1.pid ]] && tr -dc '0-9' <"$STATE/$1.pid"; }

# alive NAME: the recorded process exists, is not a zombie, and runs codistill.
alive() {
    local pid state
    pid=$(pid_of "$1") || return 1
    [[ -n $pid && -r /proc/$pid/stat ]] || return 1
    state=$(sed -E 's/^.*\) ([A-Za-z]).*$/\1/' "/proc/$pid/stat" 2>/dev/null) || return 1
    [[ $state != Z && $state != X ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q codistill
}

http_ok() { "$ROOT/.venv/bin/python" - "$1" <<'EOF' 2>/dev/null
import sys, urllib.request
urllib.request.urlopen(sys.argv[1], timeout=2)
EOF
}

url_of() {
    case "$1" in
        server) echo "http://127.0.0.1:$SERVER_PORT" ;;
        labeller) echo "http://127.0.0.1:$LABELLER_PORT/metrics" ;;
        trainer) echo "http://127.0.0.1:$TRAINER_PORT/metrics" ;;
        watcher) echo "http://127.0.0.1:$WATCHER_PORT/metrics" ;;
        traffic) echo "(sends to http://127.0.0.1:$SERVER_PORT)" ;;
    esac
}

ready_url() {
    case "$1" in
        server) echo "http://127.0.0.1:$SERVER_PORT/readyz" ;;
        labeller) echo "http://127.0.0.1:$LABELLER_PORT/metrics" ;;
        trainer) echo "http://127.0.0.1:$TRAINER_PORT/metrics" ;;
        watcher) echo "http://127.0.0.1:$WATCHER_PORT/metrics" ;;
        *) echo "" ;;
    esac
}

# run_app NAME [background]: the app's argv under its environment, log in LOGS.
run_app() {
    local name=$1 argv
    argv=$(app_argv "$name")
    [[ -n $argv ]] || { log "no command for $name"; exit 2; }
    # shellcheck disable=SC2046  # the env lines and argv are ours, without spaces in words
    if [[ ${2:-} == background ]]; then
        (cd "$ROOT" && exec setsid env $(app_env) PATH="$ROOT/.venv/bin:$PATH" $argv \
            </dev/null >>"$LOGS/$name.log" 2>&1) &
        echo $! >"$STATE/$name.pid"
    else  # in the foreground, but with a pid file, so a `down` meanwhile stops it too
        (cd "$ROOT" && exec env $(app_env) PATH="$ROOT/.venv/bin:$PATH" $argv \
            </dev/null >>"$LOGS/$name.log" 2>&1) &
        echo $! >"$STATE/$name.pid"
        local rc=0
        wait $! || rc=$?
        rm -f "$STATE/$name.pid"
        return $rc
    fi
}

fail_up() {
    log "$1 failed: last lines of $LOGS/$1.log:"
    tail -n 30 "$LOGS/$1.log" >&2 2>/dev/null || true
    log "stopping what was started"
    down
    exit 1
}

wait_ready() {
    local name=$1 url deadline=$((SECONDS + TIMEOUT))
    url=$(ready_url "$name")
    while ((SECONDS < deadline)); do
        alive "$name" || fail_up "$name"
        if [[ -z $url ]] || http_ok "$url"; then return 0; fi
        sleep 0.5
    done
    log "$name not ready after ${TIMEOUT}s"
    fail_up "$name"
}

# Prometheus finds the apps through file-SD, labelled with the compose job names.
write_targets() {
    local dir tmp
    dir=$(cat "$STATE/services/prometheus.targets_dir")
    tmp=$dir/.stack.json.tmp
    cat >"$tmp" <<EOF
[{"targets": ["127.0.0.1:$SERVER_PORT"], "labels": {"job": "codistill-server"}},
 {"targets": ["127.0.0.1:$TRAINER_PORT"], "labels": {"job": "codistill-trainer"}},
 {"targets": ["127.0.0.1:$WATCHER_PORT"], "labels": {"job": "codistill-watcher"}},
 {"targets": ["127.0.0.1:$LABELLER_PORT"], "labels": {"job": "codistill-labeller"}}]
EOF
    mv "$tmp" "$dir/stack.json"
}

up() {
    local name t0=$SECONDS
    mkdir -p "$STATE" "$LOGS" "$APP_HOME"
    for name in "${APPS[@]}"; do
        if alive "$name"; then log "$name already running (pid $(pid_of "$name")); stack.sh down first"; exit 1; fi
    done
    log "setup (log: $LOGS/setup.log)"
    if ! bash "$ROOT/scripts/setup.sh" >"$LOGS/setup.log" 2>&1; then
        tail -n 30 "$LOGS/setup.log" >&2
        exit 1
    fi
    # interrupted half-way (Ctrl-C, a killed caller): stop what was started
    trap 'log "interrupted"; down; exit 130' INT TERM
    for name in redis kafka prometheus; do services start "$name" || { down; exit 1; }; done
    write_targets
    log "prepare: data, teacher vectors, student, bundle, topics (log: $LOGS/prepare.log)"
    run_app prepare || fail_up prepare
    for name in "${APPS[@]}"; do
        run_app "$name" background
        wait_ready "$name"
        log "$name up (pid $(pid_of "$name"))"
    done
    trap - INT TERM
    cat <<EOF
codistill stack is up ($((SECONDS - t0)) s), all on 127.0.0.1:
  server      http://127.0.0.1:$SERVER_PORT   (POST /v1/rank, /v1/feedback; /docs, /metrics, /readyz)
  labeller    http://127.0.0.1:$LABELLER_PORT/metrics   (nearline labels for new queries)
  trainer     http://127.0.0.1:$TRAINER_PORT/metrics
  watcher     http://127.0.0.1:$WATCHER_PORT/metrics
  prometheus  http://127.0.0.1:$PROMETHEUS_PORT   (alerts: /alerts)
  redis       redis://127.0.0.1:$REDIS_PORT/0
  kafka       127.0.0.1:$KAFKA_PORT
  logs        $LOGS/
  snapshot    .venv/bin/codistill monitor snapshot --prometheus http://127.0.0.1:$PROMETHEUS_PORT
  stop        scripts/stack.sh down
EOF
}

stop_app() {
    local name=$1 pid deadline
    alive "$name" || { rm -f "$STATE/$name.pid"; return 0; }
    pid=$(pid_of "$name")
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + 30))
    while alive "$name" && ((SECONDS < deadline)); do sleep 0.2; done
    if alive "$name"; then
        log "$name (pid $pid) ignored TERM for 30 s; sending KILL"
        kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
        sleep 0.5
    fi
    rm -f "$STATE/$name.pid"
    log "$name stopped"
}

down() {
    local i
    for ((i = ${#APPS[@]} - 1; i >= 0; i--)); do stop_app "${APPS[i]}"; done
    stop_app prepare
    [[ -d $STATE/services ]] && services stop all
    # The trainer's checkpoints name offsets of the Kafka log just removed: a next `up`
    # starts a fresh trainer instead of refusing a resume past the log's end.
    rm -rf "$APP_HOME/online"
    return 0
}

status() {
    local name
    services status 2>/dev/null || true
    for name in "${APPS[@]}"; do
        if alive "$name"; then
            printf '%-11s running  pid %-7s %s\n' "$name" "$(pid_of "$name")" "$(url_of "$name")"
        else
            printf '%-11s stopped\n' "$name"
        fi
    done
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    env) app_env ;;
    commands) app_commands ;;
    *) sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
