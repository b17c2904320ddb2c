#!/usr/bin/env bash
# Median wall time of `capsctl --help` (target < 0.3 s). Uses hyperfine when installed, else a
# loop of N runs timed with the shell. Usage: bench/help_time.sh [N]   (default 15)
set -euo pipefail
n="${1:-15}"
cmd="${CAPSCTL:-capsctl} --help"
if command -v hyperfine >/dev/null 2>&1; then
  exec hyperfine --warmup 2 --runs "$n" --style basic "$cmd >/dev/null"
fi
python3 - "$n" "$cmd" <<'PY'
import statistics, subprocess, sys, time
n, cmd = int(sys.argv[1]), sys.argv[2]
subprocess.run(cmd, shell=True, stdout=subprocess.DEVNULL, check=True)  # warm the file cache
times = []
for _ in range(n):
    t = time.perf_counter()
    subprocess.run(cmd, shell=True, stdout=subprocess.DEVNULL, check=True)
    times.append(time.perf_counter() - t)
print(f"{cmd}: median {statistics.median(times) * 1e3:.0f} ms, min {min(times) * 1e3:.0f} ms, "
      f"max {max(times) * 1e3:.0f} ms over {n} runs")
PY
