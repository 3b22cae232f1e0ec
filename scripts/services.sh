#!/usr/bin/env bash
# Start/stop real Redis, Kafka (KRaft) and Prometheus instances for codistill's
# integration tests and benchmarks, without Docker.
#
#   scripts/services.sh start  <redis|kafka|prometheus>...
#   scripts/services.sh stop   <redis|kafka|prometheus|all>...
#   scripts/services.sh status
#   scripts/services.sh env        # `export CODISTILL_TEST_*=...` for running services
#
# Every instance binds 127.0.0.1 only, on a private port (env overrides):
#   redis       CODISTILL_REDIS_PORT              (16379)
#   kafka       CODISTILL_KAFKA_PORT              (19092)
#               CODISTILL_KAFKA_CONTROLLER_PORT   (19093)
#   prometheus  CODISTILL_PROMETHEUS_PORT         (19090)
# State (pid file, config, data, log) lives in <repo>/.services/<name>/
# (CODISTILL_SERVICES_STATE moves it: scripts/stack.sh keeps its own instances apart).
# CODISTILL_PROMETHEUS_RULES names a folder whose *.yml rule files Prometheus loads.
# `start` is idempotent, installs what is missing (install_system.sh,
# kafka_fetch.sh), waits until the service really answers (timeout
# CODISTILL_SERVICE_TIMEOUT, 60 s) and then writes .services/<name>.address,
# the file tests/conftest.py reads.  `stop` TERMs, then KILLs, and removes the
# data so the next start is clean; the log is kept for post-mortems.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE=${CODISTILL_SERVICES_STATE:-$ROOT/.services}
SERVICES=(redis kafka prometheus)
TIMEOUT=${CODISTILL_SERVICE_TIMEOUT:-60}

REDIS_PORT=${CODISTILL_REDIS_PORT:-16379}
KAFKA_PORT=${CODISTILL_KAFKA_PORT:-19092}
KAFKA_CONTROLLER_PORT=${CODISTILL_KAFKA_CONTROLLER_PORT:-19093}
PROMETHEUS_PORT=${CODISTILL_PROMETHEUS_PORT:-19090}
# Python used for the Kafka metadata probe (needs kafka-python); the java
# tool is the fallback when it is not importable.
PYTHON=${CODISTILL_PYTHON:-$ROOT/.venv/bin/python}

log() { echo "services.sh: $*" >&2; }

svc_dir() { echo "$STATE/$1"; }
pid_file() { echo "$STATE/$1/$1.pid"; }
log_file() { echo "$STATE/$1/$1.log"; }
addr_file() { echo "$STATE/$1.address"; }

# A word of the command line that identifies our process, so a recycled pid
# never gets signalled.
cmd_pattern() {
    case "$1" in
        redis) echo redis-server ;;
        kafka) echo kafka.Kafka ;;
        prometheus) echo prometheus ;;
    esac
}

address_of() {
    case "$1" in
        redis) echo "redis://127.0.0.1:$REDIS_PORT/0" ;;
        kafka) echo "127.0.0.1:$KAFKA_PORT" ;;
        prometheus) echo "http://127.0.0.1:$PROMETHEUS_PORT" ;;
    esac
}

read_pid() {
    local f
    f=$(pid_file "$1")
    [[ -s $f ]] && tr -dc '0-9' <"$f"
}

# alive NAME: our recorded process exists, is not a zombie, and is the service.
alive() {
    local pid state
    pid=$(read_pid "$1") || return 1
    [[ -n $pid && -r /proc/$pid/stat ]] || return 1
    # field 3 of /proc/PID/stat is the state; a dead child we have not reaped is Z
    state=$(sed -E 's/^.*\) ([A-Za-z]).*$/\1/' "/proc/$pid/stat" 2>/dev/null) || return 1
    [[ $state != Z && $state != X ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$(cmd_pattern "$1")"
}

# running PID: the process exists and is not a zombie (whatever it is executing yet).
running() {
    local state
    [[ -n $1 && -r /proc/$1/stat ]] || return 1
    state=$(sed -E 's/^.*\) ([A-Za-z]).*$/\1/' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ $state != Z && $state != X ]]
}

port_open() { (: </dev/tcp/127.0.0.1/"$1") 2>/dev/null; }

http_ok() {
    if command -v curl >/dev/null 2>&1; then
        curl -fsS -o /dev/null --max-time 2 "$1" 2>/dev/null
    else
        python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' "$1" 2>/dev/null
    fi
}

# launch NAME CMD...: run CMD detached (own session, stdio to the log, lock fd
# closed) so that neither the caller's pipes (pytest's capture_output) nor our
# lock stay held by the long-running service.
launch() {
    local name=$1
    shift
    setsid "$@" </dev/null >>"$(log_file "$name")" 2>&1 9>&- &
    echo $! >"$(pid_file "$name")"
}

# kill_and_wait NAME GRACE_SECONDS: TERM, then KILL after the grace period.
kill_and_wait() {
    local name=$1 grace=$2 pid deadline
    alive "$name" || return 0
    pid=$(read_pid "$name")
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + grace))
    while alive "$name" && ((SECONDS < deadline)); do sleep 0.2; done
    if alive "$name"; then
        log "$name (pid $pid) ignored TERM for ${grace}s; sending KILL"
        kill -KILL "$pid" 2>/dev/null || true
        deadline=$((SECONDS + 10))
        while alive "$name" && ((SECONDS < deadline)); do sleep 0.1; done
    fi
    # reap it if it is our own child (start failures); harmless otherwise
    wait "$pid" 2>/dev/null || true
}

# Remove everything of NAME except its log, so the next start is clean.
cleanup_state() {
    local name=$1 dir
    dir=$(svc_dir "$name")
    rm -f "$(addr_file "$name")"
    [[ $name == prometheus ]] && rm -f "$STATE/prometheus.targets_dir"
    [[ -d $dir ]] && find "$dir" -mindepth 1 -maxdepth 1 ! -name "$name.log" -exec rm -rf {} +
    return 0
}

grace_of() { if [[ $1 == kafka ]]; then echo 30; else echo 10; fi; }

# Failed start: show why, leave nothing running, exit non-zero.
fail_start() {
    local name=$1 why=$2 pid
    log "$name failed to start: $why"
    log "last lines of $(log_file "$name"):"
    tail -n 40 "$(log_file "$name")" >&2 2>/dev/null || true
    kill_and_wait "$name" 5
    pid=$(read_pid "$name") && running "$pid" && kill -KILL "$pid" 2>/dev/null  # not exec'd yet
    wait "$pid" 2>/dev/null || true
    cleanup_state "$name"
    exit 1
}

# wait_ready NAME CHECK_FUNCTION
wait_ready() {
    local name=$1 check=$2 deadline=$((SECONDS + TIMEOUT)) pid
    pid=$(read_pid "$name")
    while ((SECONDS < deadline)); do
        # Only existence here: right after launch the pid may still be bash/setsid,
        # not yet exec'd into the service, so `alive` (which checks the command) is too
        # strict on a busy machine and once failed a CI start.
        running "$pid" || fail_start "$name" "process exited"
        if "$check"; then return 0; fi
        sleep 0.25
    done
    fail_start "$name" "not ready after ${TIMEOUT}s"
}

# ---------------------------------------------------------------- redis
redis_ready() {
    [[ $(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null) == PONG ]]
}

start_redis() {
    local dir
    dir=$(svc_dir redis)
    mkdir -p "$dir/data"
    # AOF, fsynced every second: a restarted Redis comes back with its labels instead of
    # empty (an empty store would look reachable and lose every soft label). No RDB.
    launch redis redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --protected-mode yes \
        --daemonize no --save '' --appendonly yes --appendfsync everysec \
        --dir "$dir/data" --loglevel warning
    wait_ready redis redis_ready
}

# ---------------------------------------------------------------- kafka
kafka_ready() {
    port_open "$KAFKA_PORT" || return 1
    # The port opens before the broker is unfenced; only a metadata answer
    # that lists our broker means clients can produce/consume.
    if "$PYTHON" -c 'import kafka' 2>/dev/null; then
        timeout 20 "$PYTHON" - "127.0.0.1:$KAFKA_PORT" <<'EOF' >/dev/null 2>&1
import sys
from kafka import KafkaAdminClient
admin = KafkaAdminClient(bootstrap_servers=sys.argv[1], request_timeout_ms=5000,
                         bootstrap_timeout_ms=5000)
try:
    cluster = admin.describe_cluster()
    admin.list_topics()
finally:
    admin.close()
sys.exit(0 if cluster.get("brokers") else 1)
EOF
    else
        timeout 20 java -Xmx128m -cp "$KAFKA_LIB/*" "${KAFKA_LOG_OPTS[@]}" \
            org.apache.kafka.tools.BrokerApiVersionsCommand --bootstrap-server "127.0.0.1:$KAFKA_PORT" \
            >/dev/null 2>&1
    fi
}

start_kafka() {
    local dir cluster_id
    dir=$(svc_dir kafka)
    KAFKA_LIB=$(bash "$ROOT/scripts/kafka_fetch.sh" 9>&-)
    local jv
    jv=$(java -version 2>&1 | sed -nE '1s/.*version "(1\.)?([0-9]+).*/\2/p')
    if [[ -z $jv || $jv -lt 17 ]]; then
        log "Kafka 4 needs Java 17+, but \`java\` is version '${jv:-unknown}';" \
            "put a JDK 17+ first on PATH (apt-get install openjdk-17-jre-headless)"
        exit 1
    fi
    mkdir -p "$dir/data"
    # JVM flags pointing both logging stacks at the configs written below.
    KAFKA_LOG_OPTS=("-Dlog4j.configuration=file:$dir/log4j.properties"
        "-Dlog4j2.configurationFile=$dir/log4j2.properties")

    # WARN and above into the service log; Kafka's INFO chatter is huge.
    cat >"$dir/log4j.properties" <<EOF
log4j.rootLogger=WARN, stdout
log4j.appender.stdout=org.apache.log4j.ConsoleAppender
log4j.appender.stdout.layout=org.apache.log4j.PatternLayout
log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka=WARN
log4j.logger.org.apache.kafka=WARN
log4j.logger.state.change.logger=WARN
EOF
    # Kafka 4 also touches log4j2 (its Log4jController MBean); without a
    # config every JVM start prints "No configuration found" errors.
    cat >"$dir/log4j2.properties" <<EOF
status = warn
rootLogger.level = warn
rootLogger.appenderRef.stdout.ref = STDOUT
appender.stdout.type = Console
appender.stdout.name = STDOUT
appender.stdout.layout.type = PatternLayout
appender.stdout.layout.pattern = [%d] %p %m (%c)%n
EOF

    # Single-node KRaft: one process is broker and controller; everything on
    # loopback; replication factors 1 so internal topics can be created.
    cat >"$dir/server.properties" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$dir/data
num.partitions=4
auto.create.topics.enable=false
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
min.insync.replicas=1
group.initial.rebalance.delay.ms=0
EOF

    # Cluster id: 16 random bytes, base64url without padding (what
    # `StorageTool random-uuid` prints) -- saves one JVM start.
    cluster_id=$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')
    if ! java -Xmx256m -cp "$KAFKA_LIB/*" "${KAFKA_LOG_OPTS[@]}" \
        kafka.tools.StorageTool format -t "$cluster_id" -c "$dir/server.properties" \
        >>"$(log_file kafka)" 2>&1 9>&-; then
        fail_start kafka "StorageTool format failed"
    fi

    launch kafka java -Xmx768m -Xms256m -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true \
        "${KAFKA_LOG_OPTS[@]}" -Dkafka.logs.dir="$dir" \
        -cp "$KAFKA_LIB/*" kafka.Kafka "$dir/server.properties"
    wait_ready kafka kafka_ready
}

# ---------------------------------------------------------------- prometheus
prometheus_ready() { http_ok "http://127.0.0.1:$PROMETHEUS_PORT/-/ready"; }

start_prometheus() {
    local dir
    dir=$(svc_dir prometheus)
    mkdir -p "$dir/data" "$dir/targets"
    # Tests add scrape targets by dropping file-SD JSON files into targets/;
    # 1 s intervals so a value shows up in a query within a few seconds.
    local rules=""
    if [[ -n ${CODISTILL_PROMETHEUS_RULES:-} ]]; then
        rules="rule_files: [\"$(cd "$CODISTILL_PROMETHEUS_RULES" && pwd)/*.yml\"]"
    fi
    cat >"$dir/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  evaluation_interval: 1s
$rules
scrape_configs:
  - job_name: codistill
    file_sd_configs:
      - files: ["$dir/targets/*.json"]
        refresh_interval: 1s
  - job_name: prometheus
    static_configs:
      - targets: ["127.0.0.1:$PROMETHEUS_PORT"]
EOF
    if ! promtool check config "$dir/prometheus.yml" >>"$(log_file prometheus)" 2>&1; then
        fail_start prometheus "promtool rejected $dir/prometheus.yml"
    fi
    echo "$dir/targets" >"$STATE/prometheus.targets_dir"
    launch prometheus prometheus --config.file="$dir/prometheus.yml" \
        --storage.tsdb.path="$dir/data" --storage.tsdb.retention.time=1d \
        --web.listen-address="127.0.0.1:$PROMETHEUS_PORT" --web.enable-lifecycle
    wait_ready prometheus prometheus_ready
}

# ---------------------------------------------------------------- commands
check_name() {
    local n
    for n in "${SERVICES[@]}"; do [[ $1 == "$n" ]] && return 0; done
    log "unknown service '$1' (expected: ${SERVICES[*]})"
    exit 2
}

ports_of() {
    case "$1" in
        redis) echo "$REDIS_PORT" ;;
        kafka) echo "$KAFKA_PORT $KAFKA_CONTROLLER_PORT" ;;
        prometheus) echo "$PROMETHEUS_PORT" ;;
    esac
}

start_one() {
    local name=$1 port t0=$SECONDS tmp
    mkdir -p "$(svc_dir "$name")"
    # One start/stop per service at a time (parallel test workers).
    exec 9>"$STATE/$name.lock"
    flock -w $((TIMEOUT + 120)) 9 || {
        log "timed out waiting for $STATE/$name.lock"
        exit 1
    }

    if alive "$name"; then
        log "$name already running (pid $(read_pid "$name")) at $(cat "$(addr_file "$name")" 2>/dev/null || address_of "$name")"
        [[ -s $(addr_file "$name") ]] || address_of "$name" >"$(addr_file "$name")"
        exec 9>&-
        return 0
    fi
    # Stale state from a crash or a reboot: start from scratch.
    cleanup_state "$name"
    mkdir -p "$(svc_dir "$name")"

    bash "$ROOT/scripts/install_system.sh" "$name" 9>&-
    for port in $(ports_of "$name"); do
        if port_open "$port"; then
            log "port 127.0.0.1:$port is already in use by another process;" \
                "stop it or choose another port (CODISTILL_*_PORT)"
            exit 1
        fi
    done

    : >"$(log_file "$name")"
    "start_$name"

    tmp=$(addr_file "$name").tmp
    address_of "$name" >"$tmp"
    mv "$tmp" "$(addr_file "$name")"
    log "$name ready at $(address_of "$name") (pid $(read_pid "$name"), $((SECONDS - t0)) s)"
    exec 9>&-
}

stop_one() {
    local name=$1
    [[ -d $(svc_dir "$name") || -e $(addr_file "$name") ]] || return 0
    exec 9>"$STATE/$name.lock"
    flock -w 120 9 || {
        log "timed out waiting for $STATE/$name.lock"
        exit 1
    }
    if alive "$name"; then
        kill_and_wait "$name" "$(grace_of "$name")"
        if alive "$name"; then
            log "could not stop $name (pid $(read_pid "$name"))"
            exit 1
        fi
        log "$name stopped"
    fi
    cleanup_state "$name"
    exec 9>&-
}

status() {
    local name
    for name in "${SERVICES[@]}"; do
        if alive "$name"; then
            printf '%-11s running  pid %-7s %s\n' "$name" "$(read_pid "$name")" \
                "$(cat "$(addr_file "$name")" 2>/dev/null || echo '(starting)')"
        else
            printf '%-11s stopped\n' "$name"
        fi
    done
}

print_env() {
    local name var
    for name in "${SERVICES[@]}"; do
        if ! alive "$name" || [[ ! -s $(addr_file "$name") ]]; then continue; fi
        case "$name" in
            redis) var=CODISTILL_TEST_REDIS_URL ;;
            kafka) var=CODISTILL_TEST_KAFKA ;;
            prometheus) var=CODISTILL_TEST_PROMETHEUS ;;
        esac
        echo "export $var=$(cat "$(addr_file "$name")")"
    done
}

usage() {
    sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

mkdir -p "$STATE"
cmd=${1:-}
[[ $# -gt 0 ]] && shift
case "$cmd" in
    start)
        [[ $# -gt 0 ]] || usage
        for n in "$@"; do check_name "$n"; done
        for n in "$@"; do start_one "$n"; done
        ;;
    stop)
        [[ $# -gt 0 ]] || usage
        if [[ $* == all ]]; then set -- "${SERVICES[@]}"; fi
        for n in "$@"; do check_name "$n"; done
        for n in "$@"; do stop_one "$n"; done
        ;;
    status) status ;;
    env) print_env ;;
    *) usage ;;
esac
