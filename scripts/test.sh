#!/usr/bin/env bash
# Installs what the tests need (when missing) and runs every check and test of leasehold:
# formatting, clippy, docs, the test suites with ractor's cluster feature off and on, the
# examples, the load test's smoke run, and a compile of the benchmarks. Tests start their own
# redis-server, etcd and PostgreSQL (through the workspace crate test-support/).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
# The Sentinel tests (tests/redis_sentinel.rs) run three real sentinels.
command -v redis-sentinel >/dev/null 2>&1 || need+=(redis-sentinel)
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
# Certificates for the TLS tests (rediss://, etcds://).
command -v openssl >/dev/null 2>&1 || need+=(openssl)
# PostgreSQL for the fenced-write tests; Debian keeps initdb and postgres off PATH.
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null 2>&1 \
    || need+=(postgresql)
if [ ${#need[@]} -gt 0 ]; then
    echo "==> installing ${need[*]}"
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}"
fi

step() { echo; echo "==> $*"; "$@"; }

# A CI run starts from a clean clone and builds everything once: incremental compilation
# only costs it time, and full debug info makes every test binary slower to compile and link
# (backtraces keep file and line with line tables). Set here, so that every step below shares
# one set of artifacts; a developer's own runs keep their usual profile.
if [ "${CI:-}" = true ]; then
    export CARGO_INCREMENTAL=0 CARGO_PROFILE_DEV_DEBUG=line-tables-only
fi

# Every workspace member: the library, test-support/, bench-support/ and tools/loadtest/.
step cargo fmt --all --check
step cargo clippy --workspace --all-targets --all-features -- -D warnings
RUSTDOCFLAGS="-D warnings" step cargo doc --no-deps --all-features
# The default build must need neither protoc nor ractor's cluster feature; the bare one
# (no Redis either) must compile.
step cargo check --no-default-features
step cargo build
# Every test, with ractor's cluster feature off and on (message types change shape): what
# `cargo test --features testing` and `cargo test --all-features` run. Both are built first,
# one after the other; then scripts/run-test-binaries.py runs their test binaries from a pool
# of lanes (LEASEHOLD_TEST_LANES, default 3), the slowest suites first: the suites spend most
# of their time waiting on servers and ttls, not on the CPU. It prints each configuration's
# output whole when all are done, with each binary's time; the doc tests run after them.
test_binaries() {
    cargo test "$@" --no-run --message-format=json-render-diagnostics | python3 -c '
import json, os, sys
for line in sys.stdin:
    try:
        message = json.loads(line)
    except ValueError:
        continue
    if message.get("reason") == "compiler-artifact" and message.get("executable") \
            and message.get("profile", {}).get("test"):
        print(os.path.dirname(message["manifest_path"]) + "\t" + message["executable"])
'
}
runs=$(mktemp -d)
echo; echo "==> building the tests: cargo test --no-run --features testing, then --workspace --all-features"
# Not the examples: every one of them is built (and run) below, and by the build with every
# feature.
test_binaries --features testing --lib --bins --tests >"$runs/off"
# With every feature, the library's tests and the other workspace members' own in one build
# (one feature resolution, so the library is built once for both): test-support's topologies
# and its safety checker's (test-support/src/safety.rs, which must be able to fail), the load
# test's. This build compiles every example too; the steps below run them on it.
test_binaries --workspace --all-features >"$runs/all"
root=$(pwd)
awk -F '\t' -v root="$root" '$1 == root' "$runs/all" >"$runs/on"
awk -F '\t' -v root="$root" '$1 != root' "$runs/all" >"$runs/members"
lanes=${LEASEHOLD_TEST_LANES:-3}
echo; echo "==> running them, $lanes at a time ($(cat "$runs"/off "$runs"/on "$runs"/members | wc -l) test binaries)"
status=0
python3 scripts/run-test-binaries.py "$lanes" \
    "--features testing (cluster feature off)=$runs/off" \
    "--all-features (cluster feature on)=$runs/on" \
    "the other workspace members=$runs/members" || status=$?
rm -rf "$runs"
[ "$status" -eq 0 ] || exit 1
step cargo test --doc --features testing
step cargo test --doc --all-features
step cargo run --example quickstart
step cargo run --example election
step cargo run --example semaphore
step cargo run --example rwlock
step cargo run -p leasehold-loadtest -- --smoke --out target/loadtest-smoke

# The store examples, each against a throwaway server on a free loopback port, stopped by pid.
# Those that need a feature run with every feature on, as the test build built them (the
# README's `--features etcd` and the like build the library once more for each feature set,
# two minutes of CI for code that build has compiled already).
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; return 1; }
scratch=$(mktemp -d)
# Stop the servers by pid, wait (bounded) until they are gone, since a stopping PostgreSQL still
# writes into its data directory, then remove the scratch directory. Cleanup never decides the
# script's exit status.
cleanup() {
    local status=$? pids pid alive
    pids=$(cat "$scratch"/*.pid 2>/dev/null || true)
    for pid in $pids; do kill "$pid" 2>/dev/null || true; done
    for _ in $(seq 100); do
        alive=""
        for pid in $pids; do
            # A server this shell started is a zombie once it exits, until reaped: count it gone.
            if [ -e "/proc/$pid" ] && ! grep -q '^[0-9]* (.*) Z' "/proc/$pid/stat" 2>/dev/null; then
                alive=1
            fi
        done
        [ -z "$alive" ] && break
        sleep 0.1
    done
    rm -rf "$scratch" 2>/dev/null || true
    exit "$status"
}
trap cleanup EXIT

port=$(free_port)
redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$scratch" \
    --logfile "$scratch/redis.log" --daemonize yes --pidfile "$scratch/redis.pid"
wait_port "$port" || { cat "$scratch/redis.log"; exit 1; }
LEASEHOLD_REDIS_URL="redis://127.0.0.1:$port" step cargo run --example redis
LEASEHOLD_REDIS_URL="redis://127.0.0.1:$port" step cargo run --example fenced_redis

port=$(free_port)
peer="http://127.0.0.1:$(free_port)"
etcd --name example --data-dir "$scratch/etcd" \
    --listen-client-urls "http://127.0.0.1:$port" --advertise-client-urls "http://127.0.0.1:$port" \
    --listen-peer-urls "$peer" --initial-advertise-peer-urls "$peer" \
    --initial-cluster "example=$peer" >"$scratch/etcd.log" 2>&1 &
echo $! >"$scratch/etcd.pid"
wait_port "$port" || { cat "$scratch/etcd.log"; exit 1; }
LEASEHOLD_ETCD_ENDPOINTS="127.0.0.1:$port" step cargo run --all-features --example etcd
LEASEHOLD_ETCD_ENDPOINTS="127.0.0.1:$port" step cargo run --all-features --example fenced_etcd

# PostgreSQL refuses to run as root: as root, the cluster belongs to the `postgres` user the
# Debian package creates, and setpriv (which execs, so the pid file holds the server's pid)
# runs the binaries as that user.
pgbin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
pgbin=${pgbin:-$(dirname "$(command -v initdb)")}
as_pg=()
if [ "$(id -u)" -eq 0 ]; then
    chown postgres: "$scratch"
    as_pg=(setpriv --reuid=postgres --regid=postgres --init-groups --)
fi
"${as_pg[@]}" "$pgbin/initdb" -D "$scratch/pg" -U postgres -A trust --no-sync >"$scratch/initdb.log" 2>&1 \
    || { cat "$scratch/initdb.log"; exit 1; }
port=$(free_port)
"${as_pg[@]}" "$pgbin/postgres" -D "$scratch/pg" -p "$port" -h 127.0.0.1 -k "$scratch" \
    >"$scratch/postgres.log" 2>&1 &
echo $! >"$scratch/postgres.pid"
# The port opens before the server accepts sessions; pg_isready asks the server itself.
for _ in $(seq 100); do "$pgbin/pg_isready" -q -h 127.0.0.1 -p "$port" && break; sleep 0.1; done
"$pgbin/pg_isready" -q -h 127.0.0.1 -p "$port" || { cat "$scratch/postgres.log"; exit 1; }
LEASEHOLD_POSTGRES_URL="postgresql://postgres@127.0.0.1:$port/postgres" \
    step cargo run --all-features --example fenced_postgres
step cargo run --all-features --example cluster
# The same example as two processes: the gateway's node in the background (stopped by pid),
# the worker's node connecting to it.
port=$(free_port)
cargo run --all-features --example cluster -- gateway "$port" >"$scratch/gateway.log" 2>&1 &
echo $! >"$scratch/gateway.pid"
wait_port "$port" || { cat "$scratch/gateway.log"; exit 1; }
step cargo run --all-features --example cluster -- worker "127.0.0.1:$port"
kill -INT "$(cat "$scratch/gateway.pid")"
wait "$(cat "$scratch/gateway.pid")" || { cat "$scratch/gateway.log"; exit 1; }
rm -f "$scratch/gateway.pid"
# The benches compile and link in the dev profile, on the artifacts the test builds left: a
# release build of every bench took about 6 of CI's 22 minutes and checks nothing more (clippy
# has type-checked them, and `cargo bench` builds them optimised when they are run).
step cargo bench --no-run --all-features --profile dev
echo
echo "==> all checks passed"
