"""Medians of repeated benchmark lines (JSON per line on stdin), per implementation and kind."""
import json
import statistics
import sys

rows = [json.loads(l) for l in sys.stdin if l.startswith("{")]
groups = {}
for r in rows:
    groups.setdefault((r["what"], r["kernels"]), []).append(r)
by_what = {}
for (what, kernels), rs in sorted(groups.items()):
    ms = statistics.median(r["ms_median"] for r in rs)
    rss = max(r["peak_rss_mb"] for r in rs)
    gf = statistics.median(r["gflops"] for r in rs)
    ips = statistics.median(r["images_per_second"] for r in rs)
    by_what.setdefault(what, {})[kernels] = ms
    print(f"{what:16} {kernels:10} runs {len(rs)}  median {ms:8.2f} ms  {ips:7.1f} img/s  {gf:6.1f} GFLOP/s  peak RSS {rss:7.1f} MB")
for what, d in by_what.items():
    if "pytorch" in d:
        for k, ms in d.items():
            if k != "pytorch":
                print(f"{what:16} {k} / pytorch time ratio: {ms / d['pytorch']:.3f} (speed-up {d['pytorch'] / ms:.2f}x)")
