#!/usr/bin/env python3
"""The sandbox's cost over several runs of mount-bench.sh COMPARE_UNCONFINED=1.

usage: bench/sandbox-pool.py LOG...   (each LOG: the whole output of one run
of the script, stderr included, where its per-run lines are)

One table of 25 runs reads a figure's paired ratio with a spread of several
per cent (the cold figures of one run scatter by 20-40%), about as wide as
the 3% the sandbox may cost. Pooled over several tables, each figure is the
median of every run's paired ratio sandbox / no-sandbox, with a bootstrap
95% interval (seeded: the same logs always give the same interval).
"""
import random
import re
import statistics
import sys

NAMES = ["mount s", "stat cold s", "stat warm s", "read cold s", "read warm s",
         "server RSS", "cache growth", "server CPU stat", "server CPU read"]
LINE = re.compile(
    r"run (\d+) (\S+): mount ([\d.]+) s, stat cold ([\d.]+) warm ([\d.]+), "
    r"read cold ([\d.]+) warm ([\d.]+), rss (\d+) KiB, cache \+(-?\d+) MiB, "
    r"image cached -?\d+ MiB, server CPU stat ([\d.]+) s read ([\d.]+) s")


def main(logs):
    pooled = {n: [] for n in NAMES}
    for log in logs:
        runs = {}
        with open(log, encoding="utf-8", errors="replace") as f:
            for line in f:
                m = LINE.match(line)
                if m:
                    runs.setdefault(m.group(1), {})[m.group(2)] = [float(x) for x in m.groups()[2:]]
        for r in runs.values():
            if "immount" not in r or "immount-nosandbox" not in r:
                continue
            for i, name in enumerate(NAMES):
                a, b = r["immount"][i], r["immount-nosandbox"][i]
                if b > 0:
                    pooled[name].append(a / b)
    if not pooled["mount s"]:
        sys.exit("no runs with both immount and immount-nosandbox in these logs")
    rng = random.Random(1)
    print(f"sandbox cost pooled over {len(logs)} logs: median of every run's paired ratio "
          "sandbox / no-sandbox, bootstrap 95% interval")
    print("| figure | runs | median ratio | cost | 95% interval |")
    print("|---|---|---|---|---|")
    for name, q in pooled.items():
        if not q:
            continue
        boot = sorted(statistics.median(rng.choices(q, k=len(q))) for _ in range(2000))
        m = statistics.median(q)
        print(f"| {name} | {len(q)} | {m:.3f} | {100 * (m - 1):+.1f}% | {boot[49]:.3f}..{boot[1949]:.3f} |")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
