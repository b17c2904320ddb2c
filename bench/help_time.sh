#!/usr/bin/env bash
# Median wall time of `capsctl --help` (target < 0.3 s). Uses hyperfine when installed, else a
# loop of N runs timed with the shell. Usage: bench/help_time.sh [N]   (default 15)
set -euo pipefail
n="${1:-15}"
cmd="${CAPSCTL:-capsctl} --help"
if command -v hyperfine >/dev/null 2>&1; then
  exec hyperfine --warmup 2 --runs "$n" --style basic "$cmd >/dev/null"
fi
# Without hyperfine: interleave the command with a bare interpreter start (`python -c pass`, the
# floor no CLI can beat), so a busy machine shows up as a slow floor rather than a slow CLI.
python3 - "$n" "$cmd" <<'PY'
import os, statistics, subprocess, sys, time
n, cmd = int(sys.argv[1]), sys.argv[2]
floor = f"{sys.executable} -c pass"
runs = {cmd: [], floor: []}
subprocess.run(cmd, shell=True, stdout=subprocess.DEVNULL, check=True)  # warm the file cache
for _ in range(n):
    for c in runs:
        t = time.perf_counter()
        subprocess.run(c, shell=True, stdout=subprocess.DEVNULL, check=True)
        runs[c].append(time.perf_counter() - t)
for c, times in runs.items():
    print(f"{c}: median {statistics.median(times) * 1e3:.0f} ms, min {min(times) * 1e3:.0f} ms, "
          f"max {max(times) * 1e3:.0f} ms over {n} runs")
print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
PY
