#!/usr/bin/env bash
# Storage tiers and retention under load (issue 8's benchmarks), release build:
#   - produce throughput on a memory station vs a file station (ratio);
#   - throughput kept while retention (a message limit cutting all the time) and key
#     compaction run during the load, vs the plain file station;
#   - bytes reclaimed by compaction on a load that overwrites 1000 keys many times.
# One local 3-node cluster (`junction dev` on ports 17701-17703 / 18701-18703, data in a temp
# dir), ROUNDS rounds (3), station kinds alternating within each round.
#   benches/tiers.sh            ROUNDS=5 MESSAGES=500000 benches/tiers.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
ROUNDS=${ROUNDS:-3}
MESSAGES=${MESSAGES:-300000}
OUT=${OUT:-$ROOT/benches/compare/results/tiers-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
"$ROOT/scripts/ensure-deps"
export CARGO_TARGET_DIR=${RELEASE_TARGET_DIR:-$HOME/.cache/junction-target-release}
export CARGO_INCREMENTAL=0
(cd "$ROOT" && cargo build --release --locked --workspace --bin junction)
J=$CARGO_TARGET_DIR/release/junction
D=$(mktemp -d /tmp/junction-tiers.XXXXXX)
"$J" dev --data-dir "$D" --base-port 17701 --http-base-port 18701 > "$D/dev.log" 2>&1 &
DEV=$!
cleanup() { kill "$DEV" 2>/dev/null || true; wait "$DEV" 2>/dev/null || true; rm -rf "$D"; }
trap cleanup EXIT
S=127.0.0.1:17701,127.0.0.1:17702,127.0.0.1:17703
for _ in $(seq 100); do "$J" cluster status --server "$S" >/dev/null 2>&1 && break; sleep 0.3; done

for r in $(seq "$ROUNDS"); do
  for kind in file memory retention compaction; do
    st="tiers-$kind-$r"
    case $kind in
      file)       flags=(--storage file) ;;
      memory)     flags=(--storage memory) ;;
      retention)  flags=(--storage file --retention-messages 50000) ;;
      compaction) flags=(--storage file --compaction key) ;;
    esac
    "$J" station create "$st" --partitions 3 --replication-factor 3 "${flags[@]}" --server "$S" >/dev/null
    "$J" bench produce --server "$S" --station "$st" --messages "$MESSAGES" --message-size 128 \
      --producers 2 --in-flight 8 --batch-size 200 --keys 1000 --json "$OUT/$kind-$r.json" >&2
    sleep 3 # let retention / compaction take their next pass before measuring what is stored
    "$J" station describe "$st" --json --server "$S" > "$OUT/$kind-$r.describe.json"
    "$J" station delete "$st" --server "$S" >/dev/null
  done
done

python3 - "$OUT" "$MESSAGES" <<'PY' | tee "$OUT/summary.md"
import json, statistics, sys
from pathlib import Path
d, n = Path(sys.argv[1]), int(sys.argv[2])
def runs(kind):
    return sorted(d.glob(f"{kind}-*.json"), key=str)
def tput(kind):
    return [json.loads(p.read_text())["msgs_per_s"] for p in runs(kind) if not p.name.endswith("describe.json")]
def stored(kind):
    out = []
    for p in d.glob(f"{kind}-*.describe.json"):
        s = json.loads(p.read_text())
        parts = s.get("partition_info") or s.get("partitions") or []
        out.append(sum(x.get("bytes", 0) for x in parts if isinstance(x, dict)))
    return out
med = {k: statistics.median(tput(k)) for k in ["file", "memory", "retention", "compaction"] if tput(k)}
print(f"# Storage tiers and retention under load ({n} x 128 B, 1000 keys, rf 3, rounds: {len(tput('file'))})\n")
print("| station | median msg/s | vs file |")
print("|---|---|---|")
for k, v in med.items():
    print(f"| {k} | {v:,.0f} | {v / med['file']:.2f} |")
produced = n * (128 + 7)  # payload + "key-NNN"
kept = stored("compaction")
if kept:
    k = statistics.median(kept)
    print(f"\ncompaction: {produced:,} bytes produced (payload + key), {k:,.0f} live after compaction, "
          f"{produced - k:,.0f} reclaimed ({(produced - k) / produced:.1%})")
PY
