#!/usr/bin/env bash
# A local two-tier Strata on loopback: three globald, and two regions (ams, iad) of three
# regiond each, with certificates generated for them. Loads sample Machines, prints a route
# lookup and how to query each tier, then runs until Ctrl-C, which stops every node cleanly.
#
#   deploy/local-cluster.sh                 build (release) and run
#   deploy/local-cluster.sh --bin-dir DIR   use regiond and globald from DIR, build nothing
#   deploy/local-cluster.sh --dir DIR       keep data, logs and certificates in DIR
#
# Every listener takes a free port from the kernel; the addresses are read from each node's
# "node started" log line and printed.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN_DIR=""
DIR=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --bin-dir) BIN_DIR="$2"; shift 2 ;;
        --dir) DIR="$2"; shift 2 ;;
        -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done

if [[ -z "$BIN_DIR" ]]; then
    echo "building regiond and globald (release)..."
    cargo build --release --locked --manifest-path "$ROOT/Cargo.toml" \
        -p strata-regional -p strata-global
    BIN_DIR="$ROOT/target/release"
fi
REGIOND="$BIN_DIR/regiond"
GLOBALD="$BIN_DIR/globald"
for bin in "$REGIOND" "$GLOBALD"; do
    [[ -x "$bin" ]] || { echo "missing $bin" >&2; exit 1; }
done

DIR="${DIR:-$ROOT/target/local-cluster}"
rm -rf "$DIR"
mkdir -p "$DIR/certs" "$DIR/logs"
CERTS="$DIR/certs"
REGIONS=(ams iad)
PIDS=()

stop_all() {
    trap - INT TERM EXIT
    if [[ ${#PIDS[@]} -gt 0 ]]; then
        echo
        echo "stopping ${#PIDS[@]} nodes..."
        kill -TERM "${PIDS[@]}" 2>/dev/null || true
        # Each node leaves its cluster and closes its store; give them time, then insist.
        for _ in $(seq 1 100); do
            alive=0
            for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
            [[ $alive -eq 0 ]] && break
            sleep 0.1
        done
        kill -KILL "${PIDS[@]}" 2>/dev/null || true
        wait 2>/dev/null || true
        echo "stopped; data and logs are in $DIR"
    fi
}
trap 'stop_all; exit 0' INT TERM
trap 'stop_all' EXIT

quiet() { "$@" >/dev/null; }

# Certificates: a CA per cluster; the global CA also issues each region's publisher
# certificate (tier regional) and an operator certificate for the CLI.
quiet "$GLOBALD" tls ca --out "$CERTS/global" --name "local global CA"
for i in 0 1 2; do
    quiet "$GLOBALD" tls node --ca-dir "$CERTS/global" --out "$CERTS/global" \
        --name "global-$i" --region global --ip 127.0.0.1
done
quiet "$GLOBALD" tls node --ca-dir "$CERTS/global" --out "$CERTS/global" \
    --name operator --region global
for region in "${REGIONS[@]}"; do
    quiet "$REGIOND" tls ca --out "$CERTS/$region" --name "local $region CA"
    for i in 0 1 2; do
        quiet "$REGIOND" tls node --ca-dir "$CERTS/$region" --out "$CERTS/$region" \
            --name "$region-$i" --region "$region" --ip 127.0.0.1
    done
    quiet "$GLOBALD" tls node --ca-dir "$CERTS/global" --out "$CERTS/global" \
        --tier regional --region "$region" --name "$region-publisher"
done

# field NAME KEY: an address from NAME's "node started" log line, once it is there.
field() {
    local log="$DIR/logs/$1.log" line=""
    for _ in $(seq 1 600); do
        line="$(grep -m1 'node started' "$log" 2>/dev/null || true)"
        [[ -n "$line" ]] && break
        if ! kill -0 "${PIDS[-1]}" 2>/dev/null && ! grep -q 'node started' "$log"; then
            echo "$1 did not start:" >&2; tail -20 "$log" >&2; exit 1
        fi
        sleep 0.05
    done
    [[ -n "$line" ]] || { echo "$1 did not start within 30 s" >&2; tail -20 "$log" >&2; exit 1; }
    sed -E "s/.*$2=([^ ]+).*/\1/" <<<"$line"
}

# start BINARY NAME CONFIG: runs a node in the background.
start() {
    "$1" run --config "$3" 2>"$DIR/logs/$2.log" >/dev/null &
    PIDS+=("$!")
}

# node_config NAME REGION CA CERT KEY BOOTSTRAP EXTRA
node_config() {
    cat >"$DIR/$1.toml" <<EOF
[node]
name = "$1"
region = "$2"
data_dir = "$DIR/data/$1"
[gossip]
listen = "127.0.0.1:0"
bootstrap = [$6]
[gossip.tls]
ca = "$3"
cert = "$4"
key = "$5"
[api]
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
$7
EOF
}

echo "starting three globald..."
GLOBAL_SEED=""
GLOBAL_APIS=()
for i in 0 1 2; do
    name="global-$i"
    c="$CERTS/global"
    node_config "$name" global "$c/ca.crt" "$c/$name.crt" "$c/$name.key" "$GLOBAL_SEED" \
"[api.tls]
ca = \"$c/ca.crt\"
cert = \"$c/$name.crt\"
key = \"$c/$name.key\""
    start "$GLOBALD" "$name" "$DIR/$name.toml"
    [[ -z "$GLOBAL_SEED" ]] && GLOBAL_SEED="\"$(field "$name" gossip_addr)\""
    GLOBAL_APIS+=("$(field "$name" api_addr)")
done
TO="$(printf '"https://%s", ' "${GLOBAL_APIS[@]}")"
TO="${TO%, }"

declare -A REGION_API
for region in "${REGIONS[@]}"; do
    echo "starting region $region: three regiond..."
    seed=""
    for i in 0 1 2; do
        name="$region-$i"
        c="$CERTS/$region"
        g="$CERTS/global"
        node_config "$name" "$region" "$c/ca.crt" "$c/$name.crt" "$c/$name.key" "$seed" \
"[publish]
to = [$TO]
[publish.tls]
ca = \"$g/ca.crt\"
cert = \"$g/$region-publisher.crt\"
key = \"$g/$region-publisher.key\""
        start "$REGIOND" "$name" "$DIR/$name.toml"
        [[ -z "$seed" ]] && seed="\"$(field "$name" gossip_addr)\""
        api="$(field "$name" api_addr)"
        [[ $i -eq 0 ]] && REGION_API[$region]="$api"
    done
done

# exec_in REGION SQL...: one transaction on the region's first node.
exec_in() {
    local region="$1"; shift
    quiet "$REGIOND" exec --api "http://${REGION_API[$region]}" "$@"
}
machine() {
    echo "INSERT INTO machines (id, app, region, host, state, address, port, image, version)" \
         "VALUES ('$1', '$2', '$3', '$4', '$5', '$6', 8080, 'registry.local/$2:v1', 1)"
}
echo "loading sample Machines..."
exec_in ams "$(machine m-ams-1 web ams host-a1 started 10.1.0.11)" \
            "$(machine m-ams-2 web ams host-a2 started 10.1.0.12)" \
            "$(machine m-ams-3 worker ams host-a3 stopped 10.1.0.13)"
exec_in iad "$(machine m-iad-1 web iad host-i1 started 10.2.0.11)" \
            "$(machine m-iad-2 api iad host-i2 started 10.2.0.12)" \
            "$(machine m-iad-3 api iad host-i3 started 10.2.0.13)"

G="$CERTS/global"
GLOBAL_CLI=(--api "https://${GLOBAL_APIS[0]}" --ca "$G/ca.crt" --cert "$G/operator.crt"
            --key "$G/operator.key" --server-name global.global.strata)
echo "waiting for the regions to publish to the global tier..."
for _ in $(seq 1 300); do
    out="$("$GLOBALD" route web --from ams "${GLOBAL_CLI[@]}" 2>&1 || true)"
    [[ "$out" == *"app web runs in: ams, iad"* ]] && break
    sleep 0.1
done

cat <<EOF

Strata is running on loopback: three globald, regions ams and iad of three regiond each.
Data, logs and certificates: $DIR

Route lookup, as an edge proxy in ams sees it:
  \$ globald route web --from ams ...
$(sed 's/^/  /' <<<"$out")

The global tier (the application-to-region map):
  $GLOBALD query "SELECT * FROM app_regions" ${GLOBAL_CLI[*]}
  $GLOBALD route api --from ams ${GLOBAL_CLI[*]}
A region (per-Machine rows), ams:
  $REGIOND query "SELECT id, app, state, address FROM machines" --api http://${REGION_API[ams]}
  $REGIOND exec --api http://${REGION_API[ams]} "UPDATE machines SET state = 'stopped' WHERE id = 'm-ams-1'"
  $REGIOND members --api http://${REGION_API[ams]}
Any node's database, with the stock sqlite3 tool (reads only):
  sqlite3 $DIR/data/ams-1/strata.sqlite "SELECT * FROM machines"

Press Ctrl-C to stop.
EOF
while true; do
    sleep 1
    for pid in "${PIDS[@]}"; do
        kill -0 "$pid" 2>/dev/null || { echo "a node (pid $pid) exited; see $DIR/logs" >&2; exit 1; }
    done
done
