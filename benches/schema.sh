#!/usr/bin/env bash
# Produce with the station bound to a Protobuf schema (`--schema protobuf`) and without, in the
# produce shapes of the NATS comparison (benches/compare/run.sh), alternating which goes first
# in each round; prints medians and ratios (with / without).
#
#   ROUNDS=5 benches/schema.sh           # WORKLOADS="sync async128 async1k" by default
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export CARGO_TARGET_DIR=${RELEASE_TARGET_DIR:-$HOME/.cache/junction-target-release}
(cd "$ROOT" && cargo build --release --locked --workspace --bin junction)
BIN=$CARGO_TARGET_DIR/release/junction
OUT=${OUT:-$(mktemp -d)}
shape() {
  case $1 in
    sync)     echo "--message-size 128 --messages 20000 --producers 1 --in-flight 1 --batch-size 1 --partitions 1" ;;
    async128) echo "--message-size 128 --messages 1000000 --producers 1 --in-flight 5 --batch-size 200 --partitions 3" ;;
    async1k)  echo "--message-size 1024 --messages 300000 --producers 1 --in-flight 5 --batch-size 200 --partitions 3" ;;
    *) echo "unknown workload $1" >&2; exit 2 ;;
  esac
}
for r in $(seq 1 "${ROUNDS:-5}"); do
  if [ $((r % 2)) -eq 1 ]; then order="pb none"; else order="none pb"; fi
  for w in ${WORKLOADS:-sync async128 async1k}; do
    for m in $order; do
      extra=""; [ "$m" = pb ] && extra="--schema protobuf"
      # shellcheck disable=SC2046
      "$BIN" bench produce $(shape "$w") --spawn 3 --replication-factor 3 --quiet $extra \
        --json "$OUT/$w-$m-$r.json" > "$OUT/$w-$m-$r.log" 2>&1
      echo "$(date +%T) round $r $w $m done"
    done
  done
done
python3 - "$OUT" <<'PY'
import glob, json, statistics as st, sys
rows = {}
for f in glob.glob(sys.argv[1] + '/*.json'):
    w, m, r = f.split('/')[-1][:-5].split('-')
    rows.setdefault(w, {}).setdefault(int(r), {})[m] = json.load(open(f))
for w in ['sync', 'async128', 'async1k']:
    pairs = [d for d in rows.get(w, {}).values() if 'pb' in d and 'none' in d]
    if not pairs:
        continue
    t = lambda m: [d[m]['msgs_per_s'] for d in pairs]
    p = lambda m: [d[m]['latency_ms']['p99'] for d in pairs]
    per = [d['pb']['msgs_per_s'] / d['none']['msgs_per_s'] for d in pairs]
    errors = sum(d[m]['errors'] for d in pairs for m in ('pb', 'none'))
    print(f"{w}: {len(pairs)} rounds, {errors} errors | without {st.median(t('none')):,.0f} msg/s "
          f"p99 {st.median(p('none')):.2f} ms | with {st.median(t('pb')):,.0f} msg/s "
          f"p99 {st.median(p('pb')):.2f} ms | ratio of medians {st.median(t('pb')) / st.median(t('none')):.3f}, "
          f"per round {min(per):.3f}-{max(per):.3f}")
PY
echo "results in $OUT"
