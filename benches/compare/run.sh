#!/usr/bin/env bash
# Junction vs NATS JetStream on this machine, alternately, several rounds; then medians and
# ratios (benches/compare/summarize.py).
#
#   benches/compare/run.sh                          # every workload, 3 rounds
#   ROUNDS=5 WORKLOADS="async128 async1k" benches/compare/run.sh
#
# NATS runs through the peer scripts of ../shared/peers (override with PEERS=...): a 3-node
# JetStream cluster, R3 file stream, `sync_interval: always` (fsync before every ack; needs the
# newer server that peers/nats/install-newer-nats.sh installs), load from `peerbench`.
# Junction runs `junction bench` (release build) against 3 spawned `junction serve` nodes,
# replication 3, fsync before ack. The shapes match (message size, count, messages in flight):
#   sync      128 B, 1 in flight, 20 000 messages
#   async128  128 B, ≤1000 in flight from one client, 1 000 000 (NATS) / 1 000 000 messages
#   async1k   1 KiB, ≤1000 in flight, 300 000 messages
#   rate      128 B at 1000 msg/s for 20 s: produce→ack latency, corrected for coordinated
#             omission on both sides
#   consume   replay 1 000 000 stored 128 B messages (Junction: `Read`, no acks)
#   groupack  consume 1 000 000 stored 128 B messages with acks: Junction a consumer group of
#             one member acking each message on its own; NATS the same acked pull consumer
#             as `consume` (cumulative acks, every 500 messages: less work than Junction's).
#             The same window of unacknowledged messages on both sides: NATS's
#             max_ack_pending 20 000, Junction's max_in_flight 6 667 on each of 3 partitions.
#             NATS runs it once per round even when `consume` is listed too.
# Results: benches/compare/results/<time>/{nats,junction}.jsonl and summary.md.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PEERS=${PEERS:-$ROOT/../shared/peers}
ROUNDS=${ROUNDS:-3}
WORKLOADS=${WORKLOADS:-"sync async128 async1k rate consume groupack"}
OUT=${OUT:-$ROOT/benches/compare/results/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
[ -x "$PEERS/nats/run.sh" ] || { echo "peer scripts not found at $PEERS (set PEERS=)"; exit 1; }

"$ROOT/scripts/ensure-deps"
export CARGO_TARGET_DIR=${RELEASE_TARGET_DIR:-$HOME/.cache/junction-target-release}
export CARGO_INCREMENTAL=0
echo "--- building junction (release) into $CARGO_TARGET_DIR"
(cd "$ROOT" && cargo build --release --locked --workspace --bin junction)
JUNCTION=$CARGO_TARGET_DIR/release/junction
NATS_SERVER=$("$PEERS/nats/install-newer-nats.sh")
export NATS_SERVER

junction_bench() { # workload label -- args...
  local wl=$1 label=$2; shift 2
  local f
  f=$(mktemp "$OUT/j.XXXXXX.json")
  # Explicit checks: the callers test this function's status, which turns `set -e` off here.
  "$JUNCTION" bench "$@" --spawn 3 --replication-factor 3 --json "$f" >&2 || { rm -f "$f"; return 1; }
  python3 - "$f" "$wl" "$label" >> "$OUT/junction.jsonl" <<'PY' || { rm -f "$f"; return 1; }
import json, sys
r = json.load(open(sys.argv[1]))
r["peer"] = "junction"; r["workload_name"] = sys.argv[2]; r["label"] = sys.argv[3]
print(json.dumps(r))
PY
  rm -f "$f"
}

nats_bench() { # workload
  # `groupack`'s NATS side is the acked pull consumer of `consume` (summarize.py reads those
  # rows for both); skip the second run when `consume` is in this comparison as well.
  local wl=$1
  if [ "$wl" = groupack ]; then
    case " $WORKLOADS " in *" consume "*) return 0 ;; esac
    wl=consume
  fi
  REPS=1 WORKLOADS=$wl SYNC=always RESULTS="$OUT/nats.jsonl" "$PEERS/nats/run.sh" >&2
}

junction_workload() { # workload round
  local wl=$1 round=$2
  case $wl in
    sync)     junction_bench sync "sync128 r$round" produce --message-size 128 --messages 20000 --producers 1 --in-flight 1 --batch-size 1 --partitions 1 ;;
    async128) junction_bench async128 "async128 r$round" produce --message-size 128 --messages 1000000 --producers 1 --in-flight 5 --batch-size 200 --partitions 3 ;;
    async1k)  junction_bench async1k "async1k r$round" produce --message-size 1024 --messages 300000 --producers 1 --in-flight 5 --batch-size 200 --partitions 3 ;;
    rate)     junction_bench rate "rate1000 r$round" produce --message-size 128 --rate 1000 --duration 20s --producers 1 --batch-size 1 --partitions 1 ;;
    consume)  junction_bench consume "consume128 r$round" read --message-size 128 --messages 1000000 --partitions 3 ;;
    groupack) junction_bench groupack "groupack128 r$round" consume --message-size 128 --messages 1000000 --partitions 3 --member-in-flight 6667 ;;
    *) echo "unknown workload $wl" >&2; return 1 ;;
  esac
}

# A failed run (a node that did not start, a cluster not ready in time) is recorded and the
# comparison goes on: the medians come from the rounds that completed, and the summary
# lists the failures.
: > "$OUT/failures.txt"
for round in $(seq "$ROUNDS"); do
  for wl in $WORKLOADS; do
    echo "--- round $round: $wl"
    # Alternate who goes first, so that drift over time does not favour one side.
    first=nats; [ $((round % 2)) -eq 0 ] && first=junction
    for who in $first $([ $first = nats ] && echo junction || echo nats); do
      if [ $who = nats ]; then
        nats_bench "$wl" && rc=0 || rc=$?
      else
        junction_workload "$wl" "$round" && rc=0 || rc=$?
      fi
      if [ "$rc" -ne 0 ]; then
        echo "round $round: $who $wl failed (exit $rc)" | tee -a "$OUT/failures.txt" >&2
      fi
    done
  done
done
python3 "$ROOT/benches/compare/summarize.py" "$OUT" | tee "$OUT/summary.md"
if [ -s "$OUT/failures.txt" ]; then
  { echo; echo "Failed runs (not in the medians):"; sed 's/^/- /' "$OUT/failures.txt"; } | tee -a "$OUT/summary.md"
fi
