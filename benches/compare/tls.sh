#!/usr/bin/env bash
# What TLS costs, Junction and NATS JetStream side by side: each workload plaintext and with
# TLS on every connection (clients and node-to-node), alternately, several rounds; then
# medians and TLS / plaintext ratios.
#
#   benches/compare/tls.sh                         # async128 and rate, 3 rounds
#   ROUNDS=5 WORKLOADS="async128" benches/compare/tls.sh
#
# NATS: the peer scripts of ../shared/peers (PEERS=...), copied to a temp dir and given TLS:
# a throwaway CA (openssl), `tls {}` on the client port and on the cluster routes (verified
# both ways), and `peerbench` connecting with the CA (`require_tls`). The copy is patched,
# never the shared scripts. Junction: `junction bench ... --tls` (a throwaway CA, TLS on the
# client ports, mutual TLS between nodes) against `junction bench` without it. Shapes as in
# run.sh:
#   async128  128 B, ≤1000 in flight from one client, 1 000 000 messages
#   rate      128 B at 1000 msg/s for 20 s: produce→ack latency (coordinated omission
#             corrected on both sides)
# Results: benches/compare/results/tls-<time>/{nats,junction}.jsonl and summary.md.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PEERS=${PEERS:-$ROOT/../shared/peers}
ROUNDS=${ROUNDS:-3}
WORKLOADS=${WORKLOADS:-"async128 rate"}
OUT=${OUT:-$ROOT/benches/compare/results/tls-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
[ -x "$PEERS/nats/run.sh" ] || { echo "peer scripts not found at $PEERS (set PEERS=)"; exit 1; }
command -v openssl >/dev/null || { echo "openssl is needed for the NATS certificates"; exit 1; }

"$ROOT/scripts/ensure-deps"
export CARGO_INCREMENTAL=0
echo "--- building junction (release)"
(cd "$ROOT" && CARGO_TARGET_DIR=${RELEASE_TARGET_DIR:-$HOME/.cache/junction-target-release} \
  cargo build --release --locked --workspace --bin junction)
JUNCTION=${RELEASE_TARGET_DIR:-$HOME/.cache/junction-target-release}/release/junction
NATS_SERVER=$("$PEERS/nats/install-newer-nats.sh")
export NATS_SERVER

# A TLS-capable copy of the peer scripts.
W=$(mktemp -d /tmp/junction-tls-compare.XXXXXX)
trap 'rm -rf "$W"' EXIT
cp -r "$PEERS" "$W/peers"
TLSP=$W/peers
python3 - "$TLSP/bench/src/main.rs" "$TLSP/nats/run.sh" <<'PY'
import sys
main, run = sys.argv[1], sys.argv[2]
s = open(main).read()
old = """    Ok(async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .connect("""
new = """    let mut options = async_nats::ConnectOptions::new().connection_timeout(Duration::from_secs(5));
    if let Ok(ca) = std::env::var("NATS_TLS_CA") {
        options = options.add_root_certificates(ca.into()).require_tls(true);
    }
    Ok(options
        .connect("""
assert old in s, "peerbench's nats_connect changed; update benches/compare/tls.sh"
open(main, "w").write(s.replace(old, new, 1))
r = open(run).read()
old = '  cat > "$W/n$i.conf" <<CONF\n'
assert old in r, "peers/nats/run.sh changed; update benches/compare/tls.sh"
r = r.replace(old, """  tlsline=""; routetls=""
  if [ -n "${NATS_TLS_DIR:-}" ]; then
    certs="cert_file: \\"$NATS_TLS_DIR/server.pem\\", key_file: \\"$NATS_TLS_DIR/server.key\\", ca_file: \\"$NATS_TLS_DIR/ca.pem\\""
    tlsline="tls { $certs }"
    routetls="tls { $certs, verify: true }"
  fi
""" + old, 1)
old = "  $syncline\n}\n"
assert old in r
r = r.replace(old, old + "$tlsline\n", 1)
old = "  routes: [ $routes ]\n"
assert old in r
r = r.replace(old, old + "  $routetls\n", 1)
open(run, "w").write(r)
PY

# A throwaway CA and one certificate for 127.0.0.1 / localhost (server and client use).
C=$W/certs
mkdir -p "$C"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -subj "/CN=junction-compare-ca" -keyout "$C/ca.key" -out "$C/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=localhost" \
  -keyout "$C/server.key" -out "$C/server.csr" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n' > "$C/ext"
openssl x509 -req -in "$C/server.csr" -CA "$C/ca.pem" -CAkey "$C/ca.key" -CAcreateserial \
  -days 2 -extfile "$C/ext" -out "$C/server.pem" 2>/dev/null

# The patched peerbench gets its own target dir (seeded from the shared one when present).
export CARGO_TARGET_DIR=/tmp/peers-bench-tls-target
if [ ! -d "$CARGO_TARGET_DIR" ] && [ -d /tmp/peers-bench-target ]; then
  cp -r /tmp/peers-bench-target "$CARGO_TARGET_DIR"
fi

nats_bench() { # workload tls(0|1)
  if [ "$2" = 1 ]; then
    NATS_TLS_DIR=$C NATS_TLS_CA=$C/ca.pem REPS=1 WORKLOADS=$1 SYNC=always \
      RESULTS="$OUT/nats-tls.jsonl" "$TLSP/nats/run.sh" >&2
  else
    REPS=1 WORKLOADS=$1 SYNC=always RESULTS="$OUT/nats-plain.jsonl" "$TLSP/nats/run.sh" >&2
  fi
}

junction_bench() { # workload tls(0|1) round
  local wl=$1 tls=$2 round=$3 f flag=() file=junction-plain
  [ "$tls" = 1 ] && { flag=(--tls); file=junction-tls; }
  f=$(mktemp "$OUT/j.XXXXXX.json")
  case $wl in
    async128) "$JUNCTION" bench produce --message-size 128 --messages 1000000 --producers 1 \
                --in-flight 5 --batch-size 200 --partitions 3 "${flag[@]}" \
                --spawn 3 --replication-factor 3 --quiet --json "$f" >&2 || { rm -f "$f"; return 1; } ;;
    rate) "$JUNCTION" bench produce --message-size 128 --rate 1000 --duration 20s --producers 1 \
            --batch-size 1 --partitions 1 "${flag[@]}" \
            --spawn 3 --replication-factor 3 --quiet --json "$f" >&2 || { rm -f "$f"; return 1; } ;;
    *) echo "unknown workload $wl" >&2; rm -f "$f"; return 1 ;;
  esac
  python3 - "$f" "$wl" "$round" >> "$OUT/$file.jsonl" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
r["workload_name"] = sys.argv[2]; r["round"] = int(sys.argv[3])
print(json.dumps(r))
PY
  rm -f "$f"
}

: > "$OUT/failures.txt"
for round in $(seq "$ROUNDS"); do
  for wl in $WORKLOADS; do
    # Alternate the order (plaintext first, then TLS first), so drift favours neither.
    order="0 1"; [ $((round % 2)) -eq 0 ] && order="1 0"
    for tls in $order; do
      echo "--- round $round: $wl, tls=$tls"
      nats_bench "$wl" "$tls" || echo "round $round: nats $wl tls=$tls failed" | tee -a "$OUT/failures.txt" >&2
      junction_bench "$wl" "$tls" "$round" || echo "round $round: junction $wl tls=$tls failed" | tee -a "$OUT/failures.txt" >&2
    done
  done
done

python3 - "$OUT" <<'PY' | tee "$OUT/summary.md"
import json, os, statistics, sys
out = sys.argv[1]
def load(name):
    p = os.path.join(out, name + ".jsonl")
    return [json.loads(l) for l in open(p)] if os.path.exists(p) else []
def nats_rows(name):
    rows = {}
    for r in load(name):
        label = r.get("label", "")
        wl = "async128" if label.startswith("async128") else "rate" if label.startswith("rate") else None
        if wl is None or r.get("fill"):
            continue
        rows.setdefault(wl, []).append((r.get("msgs_per_s"), (r.get("p99_us") or 0) / 1000.0))
    return rows
def junction_rows(name):
    rows = {}
    for r in load(name):
        # Timed from the actual send, as peerbench times NATS.
        lat = r.get("latency_from_send_ms") or r.get("latency_ms") or {}
        rows.setdefault(r["workload_name"], []).append((r.get("msgs_per_s"), lat.get("p99")))
    return rows
def med(xs):
    xs = [x for x in xs if isinstance(x, (int, float))]
    return statistics.median(xs) if xs else float("nan")
print("| peer | workload | plaintext msg/s | TLS msg/s | TLS/plain throughput | plaintext p99 ms | TLS p99 ms | TLS/plain p99 |")
print("|---|---|---|---|---|---|---|---|")
for peer, plain, tls in [("NATS", nats_rows("nats-plain"), nats_rows("nats-tls")),
                         ("Junction", junction_rows("junction-plain"), junction_rows("junction-tls"))]:
    for wl in sorted(set(plain) | set(tls)):
        pt, pp = med([t for t, _ in plain.get(wl, [])]), med([p for _, p in plain.get(wl, [])])
        tt, tp = med([t for t, _ in tls.get(wl, [])]), med([p for _, p in tls.get(wl, [])])
        print(f"| {peer} | {wl} | {pt:,.0f} | {tt:,.0f} | {tt/pt:.3f} | {pp:.2f} | {tp:.2f} | {tp/pp:.3f} |")
PY
if [ -s "$OUT/failures.txt" ]; then
  { echo; echo "Failed runs (not in the medians):"; sed 's/^/- /' "$OUT/failures.txt"; } | tee -a "$OUT/summary.md"
fi
