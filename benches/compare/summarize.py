#!/usr/bin/env python3
"""Medians and ratios of a `benches/compare/run.sh` results directory.

Reads <dir>/nats.jsonl (peerbench lines) and <dir>/junction.jsonl (`junction bench --json`
reports) and prints a Markdown table per workload: median msgs/s, p99 latency and server CPU
per message of each side, and Junction / NATS ratios.
"""
import json
import statistics
import sys
from pathlib import Path

# peerbench label prefix -> workload
NATS_LABELS = {"sync128": "sync", "async128": "async128", "async1k": "async1k",
               "rate1000": "rate", "consume128": "consume"}


def load(path):
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def nats_rows(rows):
    out = {}
    for r in rows:
        wl = NATS_LABELS.get(r.get("label", "").split(" ")[0])
        if wl is None or r.get("fill"):
            continue
        cpu = r.get("server_cpu_s")
        msgs = r.get("msgs") or 0
        out.setdefault(wl, []).append({
            "msgs_per_s": r.get("msgs_per_s", 0.0),
            "p99_ms": (r.get("p99_us") or 0) / 1000.0,
            "p50_ms": (r.get("p50_us") or 0) / 1000.0,
            "cpu_us": cpu * 1e6 / msgs if cpu and msgs else None,
        })
    return out


def junction_rows(rows):
    out = {}
    for r in rows:
        wl = r.get("workload_name")
        lat = r.get("latency_ms") or {}
        sent = r.get("latency_from_send_ms") or {}
        out.setdefault(wl, []).append({
            "msgs_per_s": r.get("msgs_per_s", 0.0),
            # peerbench times each message from its actual send; so does this column.
            "p99_ms": sent.get("p99", lat.get("p99", 0.0)),
            "p50_ms": sent.get("p50", lat.get("p50", 0.0)),
            "p99_intended_ms": lat.get("p99", 0.0),
            "cpu_us": r.get("server_cpu_us_per_msg"),
            "write_amp": r.get("write_amplification"),
        })
    return out


def med(rows, key):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def fmt(v, digits=0):
    return "-" if v is None else f"{v:,.{digits}f}"


def main():
    d = Path(sys.argv[1])
    nats = nats_rows(load(d / "nats.jsonl"))
    junc = junction_rows(load(d / "junction.jsonl"))
    print(f"# Junction vs NATS JetStream (fsync always), {d.name}\n")
    print("Medians of the rounds (n = rounds per side). Ratio = Junction / NATS for throughput, "
          "NATS / Junction for p99 and CPU (above 1 means Junction is better).\n")
    print("| workload | n | NATS msg/s | Junction msg/s | ratio | NATS p99 ms | Junction p99 ms | "
          "p99 ratio | NATS CPU µs/msg | Junction CPU µs/msg | CPU ratio | Junction write amp |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for wl in ["sync", "async128", "async1k", "rate", "consume", "groupack"]:
        # groupack: Junction's acked consumer group against NATS's acked pull consumer, which
        # is the `consume` run on the NATS side.
        n, j = nats.get("consume" if wl == "groupack" else wl, []), junc.get(wl, [])
        if not n and not j:
            continue
        nt, jt = med(n, "msgs_per_s"), med(j, "msgs_per_s")
        np99, jp99 = med(n, "p99_ms"), med(j, "p99_ms")
        nc, jc = med(n, "cpu_us"), med(j, "cpu_us")
        ratio = jt / nt if nt and jt else None
        p99r = np99 / jp99 if np99 and jp99 else None
        cpur = nc / jc if nc and jc else None
        print(f"| {wl} | {len(n)}/{len(j)} | {fmt(nt)} | {fmt(jt)} | {fmt(ratio, 2)} | "
              f"{fmt(np99, 1)} | {fmt(jp99, 1)} | {fmt(p99r, 2)} | {fmt(nc, 1)} | {fmt(jc, 1)} | "
              f"{fmt(cpur, 2)} | {fmt(med(j, 'write_amp'), 2)} |")
    print("\nLatency is timed from each batch's actual send on both sides (peerbench's definition). "
          "For `rate`, Junction's bench also reports it from the intended send time "
          "(coordinated omission corrected):\n")
    for wl in ["sync", "rate"]:
        n, j = nats.get(wl, []), junc.get(wl, [])
        if not n or not j:
            continue
        print(f"- {wl}: p50 NATS {fmt(med(n, 'p50_ms'), 2)} ms, Junction {fmt(med(j, 'p50_ms'), 2)} ms; "
              f"p99 NATS {fmt(med(n, 'p99_ms'), 2)} ms, Junction {fmt(med(j, 'p99_ms'), 2)} ms "
              f"(from intended send time: {fmt(med(j, 'p99_intended_ms'), 2)} ms)")


if __name__ == "__main__":
    main()
