#!/usr/bin/env bash
# Fetch the Apache Kafka broker + tools jars from Maven Central into a cache
# directory and print that lib directory on stdout (everything else goes to
# stderr, so callers can do  lib=$(scripts/kafka_fetch.sh)).
#
# Kafka is not packaged in Debian or on PyPI and these machines have no Docker
# daemon, but Maven Central is reachable: a throwaway pom (scripts/kafka/pom.xml)
# plus `mvn dependency:copy-dependencies` flattens the runtime classpath.
#
# Cache: ${CODISTILL_CACHE:-$HOME/.cache/codistill}/kafka-$KAFKA_VERSION/lib
# A marker file is written last, so an interrupted fetch is redone, never used.
set -euo pipefail

KAFKA_VERSION=4.3.1
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${CODISTILL_CACHE:-$HOME/.cache/codistill}
DEST=$CACHE/kafka-$KAFKA_VERSION
LIB=$DEST/lib
MARKER=$LIB/.complete

if [[ -f $MARKER ]]; then
    echo "$LIB"
    exit 0
fi

mkdir -p "$DEST"
# Serialise concurrent fetches (e.g. parallel test workers); fd 9 is closed
# automatically when this script exits.
exec 9>"$DEST/.lock"
flock -w 600 9 || {
    echo "kafka_fetch.sh: timed out waiting for $DEST/.lock" >&2
    exit 1
}
if [[ -f $MARKER ]]; then # another process finished while we waited
    echo "$LIB"
    exit 0
fi

if ! command -v mvn >/dev/null 2>&1 || ! command -v java >/dev/null 2>&1; then
    bash "$ROOT/scripts/install_system.sh" kafka
fi

# Leftovers of a fetch that was killed (we hold the lock, so none is live).
rm -rf "$DEST"/.fetch.*
work=$(mktemp -d "$DEST/.fetch.XXXXXX")
trap 'rm -rf "$work"' EXIT
sed "s/@KAFKA_VERSION@/$KAFKA_VERSION/g" "$ROOT/scripts/kafka/pom.xml" >"$work/pom.xml"

echo "kafka_fetch.sh: resolving Kafka $KAFKA_VERSION from Maven Central (~55 MB)..." >&2
start=$SECONDS
# Maven's output goes to a file (even with -q it emits colour codes); it is
# shown only when the resolution fails.
if ! (cd "$work" && mvn -q -B -f pom.xml dependency:copy-dependencies \
    -DoutputDirectory="$work/lib" -DincludeScope=runtime) >"$work/mvn.log" 2>&1; then
    echo "kafka_fetch.sh: mvn dependency:copy-dependencies failed:" >&2
    tail -n 40 "$work/mvn.log" >&2
    exit 1
fi

# Sanity-check before publishing: the broker and tools jars must be there.
for jar in "kafka_2.13-$KAFKA_VERSION.jar" "kafka-tools-$KAFKA_VERSION.jar" "kafka-clients-$KAFKA_VERSION.jar" \
    "slf4j-reload4j-1.7.36.jar"; do
    if [[ ! -f $work/lib/$jar ]]; then
        echo "kafka_fetch.sh: $jar missing after mvn copy-dependencies" >&2
        exit 1
    fi
done

# Replace any partial copy, then write the marker last.
rm -rf "$LIB"
mv "$work/lib" "$LIB"
count=$(find "$LIB" -maxdepth 1 -name '*.jar' | wc -l)
printf 'kafka %s\njars %s\n' "$KAFKA_VERSION" "$count" >"$MARKER"
echo "kafka_fetch.sh: $count jars in $LIB ($((SECONDS - start)) s)" >&2
echo "$LIB"
