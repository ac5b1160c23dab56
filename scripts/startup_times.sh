#!/usr/bin/env bash
# Times the CLI's start-up and a small sweep: `sparsefw --help`, `sparsefw train --help`, a
# 1-step quickstart run, and 3 recipes × 2 densities × 3 seeds of 10-epoch digits runs with
# --jobs 2. Run it on a quiet machine, or run it for two trees in turn (and again) and compare
# the same rounds: on a shared machine the numbers move with everyone else's load.
# Usage: bash scripts/startup_times.sh [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-2}
out=runs/startup-times
mkdir -p "$out"
for round in $(seq "$rounds"); do
    for cmd in "--help" "train --help" \
               "train configs/quickstart.toml --set train.max_steps=1 --run-dir $out/one-step"; do
        /usr/bin/time -f "round $round: sparsefw $cmd: %e s wall, %U s user" \
            sparsefw $cmd > /dev/null 2> "$out/time.txt" || true
        tail -1 "$out/time.txt"
    done
    rm -rf "$out/sweep"
    start=$(date +%s.%N)
    sparsefw sweep configs/{static,set,rigl}.toml --grid sparsity.density=0.1,0.02 --seeds 3 \
        --jobs 2 --set train.epochs=10 --set 'logging.observers=["jsonl"]' \
        --out "$out/sweep" > "$out/sweep.log" 2>&1
    echo "round $round: sweep of 18 10-epoch runs, --jobs 2: $(echo "$(date +%s.%N) - $start" | bc) s wall"
done
