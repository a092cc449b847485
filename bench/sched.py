#!/usr/bin/env python3
"""Scheduling delay and run length per task, from `perf sched timehist`.

    perf sched record -a -o sched.data -- <bench command>
    perf sched timehist -i sched.data > timehist.txt
    bench/sched.py timehist.txt [TASK ...]

For each task name (the agents' data-plane threads are `data`): how long a
woken thread waited for a CPU (sch delay) and how long it then ran, as
percentiles in milliseconds. Without TASK: the 15 busiest names.
"""
import collections
import re
import sys


def main():
    delays, runs = collections.defaultdict(list), collections.defaultdict(list)
    for line in open(sys.argv[1]):
        f = line.split()
        # time, [cpu], task[tid/pid], wait, sch delay, run time
        if len(f) < 6 or not re.match(r"^\d+\.\d+$", f[0]):
            continue
        try:
            sch, run = float(f[4]), float(f[5])
        except ValueError:
            continue
        name = re.sub(r"\[.*", "", f[2])
        delays[name].append(sch)
        runs[name].append(run)
    names = sys.argv[2:] or [n for n, _ in sorted(delays.items(), key=lambda kv: -len(kv[1]))[:15]]

    def pct(v, q):
        v = sorted(v)
        return v[min(len(v) - 1, int(len(v) * q))]

    print(f"{'task':<20}{'n':>8} | {'delay p50':>9}{'p99':>8}{'p99.9':>8}{'max':>8} | {'run p50':>8}{'p99':>8}{'p99.9':>8}{'max':>8}{'>1ms':>6}")
    for n in names:
        d, r = delays.get(n), runs.get(n)
        if not d:
            continue
        long_runs = sum(1 for x in r if x > 1.0)
        print(
            f"{n:<20}{len(d):>8} | {pct(d, .5):>9.3f}{pct(d, .99):>8.3f}{pct(d, .999):>8.3f}{max(d):>8.3f}"
            f" | {pct(r, .5):>8.3f}{pct(r, .99):>8.3f}{pct(r, .999):>8.3f}{max(r):>8.3f}{long_runs:>6}"
        )


if __name__ == "__main__":
    main()
