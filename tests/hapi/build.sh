#!/usr/bin/env bash
# Builds the HAPI FHIR test upstream (target/hapi-test-server.jar) unless the jar is newer than every
# source. Needs Java 17+ and Maven; downloads go to ~/.m2 and are reused by the next build.
set -euo pipefail
cd "$(dirname "$0")"
JAR=target/hapi-test-server.jar
for tool in java mvn; do
  if ! command -v "$tool" >/dev/null; then
    echo "tests/hapi/build.sh: '$tool' is not installed (Java 17+ and Maven are needed: apt-get install openjdk-17-jdk-headless maven)" >&2
    exit 1
  fi
done
if [ -f "$JAR" ] && [ -z "$(find pom.xml build.sh src -newer "$JAR" -print -quit)" ]; then
  exit 0
fi
echo "tests/hapi/build.sh: building the HAPI FHIR test upstream (a first build downloads ~350 MB into ~/.m2)" >&2
started=$SECONDS
if ! nice mvn -B -q --no-transfer-progress package -DskipTests >target.log 2>&1; then
  tail -n 60 target.log >&2
  echo "tests/hapi/build.sh: mvn package failed (full log: tests/hapi/target.log)" >&2
  exit 1
fi
rm -f target.log
touch "$JAR"
echo "tests/hapi/build.sh: built $JAR in $((SECONDS - started)) s" >&2
