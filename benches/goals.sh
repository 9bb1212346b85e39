#!/usr/bin/env bash
# The Junction-only goals of the benchmark suite, each with the command that measures it:
#
#   readers    10 readers tailing while producing keep >= 90 % of the producer throughput
#              (`produce` and `e2e --readers 10`, same shape, alternating, ROUNDS rounds)
#   writeamp   bytes written to disk per byte produced, per replica, over a long 1 KiB load
#              (/proc/PID/io and RocksDB's own counters: WAL, flush, compaction)
#   idle       CPU of each node with idle partitions (rf 3), for PARTITIONS_LIST
#   failover   leader kill -> produce resumes: `junction chaos` with kill faults only; the
#              report's "kill -> first ack on the partition" distribution
#
#   benches/goals.sh                       # all of them, 3 rounds
#   ROUNDS=5 GOALS="readers idle" benches/goals.sh
#
# Release build, 3 spawned nodes on loopback, replication 3, fsync before ack.
# Results: benches/goals-results/<time>/*.json and *.log.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
ROUNDS=${ROUNDS:-3}
GOALS=${GOALS:-"readers writeamp idle failover"}
PARTITIONS_LIST=${PARTITIONS_LIST:-"100 300"}
OUT=${OUT:-$ROOT/benches/goals-results/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"

"$ROOT/scripts/ensure-deps"
export CARGO_TARGET_DIR=${RELEASE_TARGET_DIR:-$HOME/.cache/junction-target-release}
export CARGO_INCREMENTAL=0
echo "--- building junction (release) into $CARGO_TARGET_DIR"
(cd "$ROOT" && cargo build --release --locked --workspace --bin junction)
J=$CARGO_TARGET_DIR/release/junction

for goal in $GOALS; do
  case $goal in
    readers)
      shape=(--message-size 128 --messages 1000000 --producers 1 --in-flight 5 --batch-size 200 --partitions 3 --spawn 3 --replication-factor 3 --quiet)
      for round in $(seq "$ROUNDS"); do
        "$J" bench produce "${shape[@]}" --json "$OUT/readers-alone-r$round.json" | tee -a "$OUT/readers.log"
        "$J" bench e2e "${shape[@]}" --readers 10 --json "$OUT/readers-10-r$round.json" | tee -a "$OUT/readers.log"
      done
      python3 - "$OUT" "$ROUNDS" <<'PY' | tee -a "$OUT/summary.md"
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
alone = [json.load(open(f"{out}/readers-alone-r{r}.json"))["msgs_per_s"] for r in range(1, rounds + 1)]
tail = [json.load(open(f"{out}/readers-10-r{r}.json"))["produce_msgs_per_s"] for r in range(1, rounds + 1)]
a, t = statistics.median(alone), statistics.median(tail)
print(f"readers: produce alone {', '.join(f'{x:,.0f}' for x in alone)} msg/s (median {a:,.0f}); "
      f"with 10 readers tailing {', '.join(f'{x:,.0f}' for x in tail)} msg/s (median {t:,.0f}); "
      f"kept {t / a:.0%}")
PY
      ;;
    writeamp)
      "$J" bench produce --message-size 1024 --messages 2000000 --producers 1 --in-flight 5 --batch-size 200 --partitions 3 --spawn 3 --replication-factor 3 --quiet --json "$OUT/writeamp.json" | tee "$OUT/writeamp.log"
      echo "writeamp: $(grep -E 'write amp|by cause' "$OUT/writeamp.log" | tr -s ' ' | paste -sd ';')" | tee -a "$OUT/summary.md"
      ;;
    idle)
      for p in $PARTITIONS_LIST; do
        "$J" bench idle --partitions "$p" --duration 30s --spawn 3 --replication-factor 3 --quiet --json "$OUT/idle-$p.json" | tee "$OUT/idle-$p.log"
        echo "idle $p partitions: $(grep 'CPU per node' "$OUT/idle-$p.log")" | tee -a "$OUT/summary.md"
      done
      ;;
    failover)
      "$J" chaos --duration 3m --seed 502 --faults kill-partition-leader,kill-node,kill-meta-leader --fault-interval 3s --out "$OUT/failover" | tee "$OUT/failover.log"
      echo "failover: $(grep -A1 'recovery after leader kills' "$OUT/failover.log" | tail -1 | tr -s ' ')" | tee -a "$OUT/summary.md"
      ;;
    *) echo "unknown goal $goal" >&2 ;;
  esac
done
echo "--- summary: $OUT/summary.md"
