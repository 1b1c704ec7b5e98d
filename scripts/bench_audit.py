#!/usr/bin/env python3
"""Micro-benchmark: AuditLog appends per second and µs per event, fsync "batch" vs "always".

"batch" is what the daemon runs: each append is written at once (so a full disk still refuses
the action), and a thread calls flush() (fsync + metadata.db checkpoint) every 100 ms.
"always" fsyncs and checkpoints every event, as the CLI does. Both use a real metadata.db
for the checkpoint, in a temporary directory on the file system named by --dir.

    python scripts/bench_audit.py [--events 20000] [--always-events 500] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from broker.store.audit import AuditLog, read_lines, verify
from broker.store.metadata import Metadata

KEY = os.urandom(32)
FIELDS = {"secret_ref": "openai_api_key", "consumer": "ugent-core", "purpose": "llm.chat",
          "delivery": "http_header_inject", "provider": "openai", "route": "v1/chat/completions",
          "status": 200, "duration_ms": 812, "bytes_out": 14233, "lease_id": "lse_" + "a" * 22}


def bench(directory: Path, mode: str, events: int) -> dict[str, float]:
    path = directory / f"audit-{mode}.log"
    checkpoints = Metadata(directory / f"metadata-{mode}.db")
    log = AuditLog(path, KEY, checkpoints.advance_checkpoint, fsync=mode)
    stop = threading.Event()

    def flusher() -> None:  # the daemon's `_every(0.1, flush)`
        while not stop.wait(0.1):
            log.flush()

    thread = threading.Thread(target=flusher, daemon=True)
    if mode == "batch":
        thread.start()
    latencies = []
    started = time.perf_counter()
    for _ in range(events):
        t0 = time.perf_counter_ns()
        log.append("proxy.request", "broker", **FIELDS)
        latencies.append((time.perf_counter_ns() - t0) / 1000)
    elapsed = time.perf_counter() - started
    stop.set()
    if thread.is_alive():
        thread.join()
    log.close()  # final flush: everything durable and checkpointed
    verdict = verify(read_lines(path), KEY, checkpoints.checkpoint())
    assert verdict.ok and verdict.checked == events, verdict
    checkpoints.close()
    latencies.sort()
    return {"events": events, "per_sec": events / elapsed, "mean_us": elapsed / events * 1e6,
            "p50_us": statistics.median(latencies),
            "p99_us": latencies[int(len(latencies) * 0.99) - 1],
            "bytes": path.stat().st_size / events}


def fs_type(path: Path) -> str:
    proc = subprocess.run(["df", "-T", str(path)], capture_output=True, text=True)
    lines = proc.stdout.splitlines()
    return lines[1].split()[1] if proc.returncode == 0 and len(lines) > 1 else "?"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=20000, help="events for batch mode")
    parser.add_argument("--always-events", type=int, default=500, help="events for always")
    parser.add_argument("--dir", default=None, help="where to write (default: the temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sb-audit-bench-", dir=args.dir) as tmp:
        directory = Path(tmp)
        results = {"batch": bench(directory, "batch", args.events),
                   "always": bench(directory, "always", args.always_events)}
        where = f"{directory.parent} ({fs_type(directory)})"
    print(f"AuditLog.append, one proxy.request event, log on {where}, {os.cpu_count()} CPUs\n")
    print(f"{'fsync':8} {'events':>7} {'appends/s':>10} {'µs/event':>9} {'p50 µs':>8} "
          f"{'p99 µs':>8} {'bytes/line':>10}")
    for mode, r in results.items():
        print(f"{mode:8} {r['events']:7.0f} {r['per_sec']:10.0f} {r['mean_us']:9.1f} "
              f"{r['p50_us']:8.1f} {r['p99_us']:8.1f} {r['bytes']:10.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
