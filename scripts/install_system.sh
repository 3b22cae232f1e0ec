#!/usr/bin/env bash
# Install the system packages that codistill's real-service tests and
# benchmarks need (Debian/Ubuntu, apt).  There is no Docker daemon on the
# project's machines, so services run from distro packages instead:
#
#   redis       redis-server, redis-tools (redis-cli)
#   prometheus  prometheus (+ promtool)
#   kafka       openjdk-17-jre-headless, maven (the broker jars come from
#               Maven Central through scripts/kafka_fetch.sh)
#   compose     docker-compose 1.29, only to validate docker-compose.yml offline
#
# Usage: scripts/install_system.sh [all|redis|prometheus|kafka|compose]...
# Idempotent: a group whose binaries are already on PATH is skipped, and
# `apt-get update` only runs when something has to be installed.
set -euo pipefail

usage() {
    echo "usage: $0 [all|redis|prometheus|kafka|compose]..." >&2
    exit 2
}

groups=("$@")
[[ ${#groups[@]} -eq 0 ]] && groups=(all)

declare -a missing=()
# need BINARY PACKAGE... : queue the packages when the binary is not on PATH.
need() {
    local bin=$1
    shift
    command -v "$bin" >/dev/null 2>&1 || missing+=("$@")
}

# Kafka 4.x needs Java 17+; an older default java counts as missing.
java_ok() {
    local v
    command -v java >/dev/null 2>&1 || return 1
    v=$(java -version 2>&1 | sed -nE '1s/.*version "(1\.)?([0-9]+).*/\2/p')
    [[ -n $v && $v -ge 17 ]]
}
need_java() { java_ok || missing+=(openjdk-17-jre-headless); }

for group in "${groups[@]}"; do
    case "$group" in
        redis)
            need redis-server redis-server
            need redis-cli redis-tools
            ;;
        prometheus)
            need prometheus prometheus
            need promtool prometheus
            ;;
        kafka)
            need_java
            need mvn maven
            ;;
        compose) need docker-compose docker-compose ;;
        all)
            need redis-server redis-server
            need redis-cli redis-tools
            need prometheus prometheus
            need promtool prometheus
            need_java
            need mvn maven
            need docker-compose docker-compose
            ;;
        -h | --help) usage ;;
        *)
            echo "install_system.sh: unknown group '$group'" >&2
            usage
            ;;
    esac
done

if [[ ${#missing[@]} -eq 0 ]]; then
    exit 0
fi
# de-duplicate (prometheus provides two binaries)
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_system.sh: need ${missing[*]} but apt-get is not available;" \
        "install them with your package manager." >&2
    exit 1
fi

# Root runs apt directly; otherwise non-interactive sudo, never a password prompt
# (a hung prompt inside a test fixture is worse than a clear failure).
SUDO=()
if [[ $(id -u) -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO=(sudo -n)
    else
        echo "install_system.sh: need root to install: ${missing[*]}" >&2
        echo "  run:  sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
        exit 1
    fi
fi

# Wait for the dpkg lock instead of failing (unattended-upgrades on CI images).
APT=("${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -q -y -o DPkg::Lock::Timeout=300)

echo "install_system.sh: installing ${missing[*]}" >&2
"${APT[@]}" update >&2
"${APT[@]}" install --no-install-recommends "${missing[@]}" >&2

# The Debian packages ship init scripts/units that may start system-wide
# redis/prometheus on their default ports; the project never uses those
# (services.sh runs private instances on 1xxxx ports), so they are left alone.
echo "install_system.sh: done" >&2
