#!/usr/bin/env bash
# Regenerates the method tables in docs/results/ from the recipes in configs/ on the embedded
# digits data: every unstructured pipeline and correction at 90% and 98% sparsity (the static
# control with both [sparsity] init values), the lottery ticket at about the same two
# densities, and the N:M recipes at 2:4, 1:8 and 1:16.
# Usage: bash scripts/method_tables.sh [SEEDS] [JOBS]   (about 10 minutes on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
seeds=${1:-2}
jobs=${2:-2}
out=runs/method-tables
docs=docs/results
mkdir -p "$docs"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

sparsefw sweep configs/{static,static_sparse_init,set,rigl,dsr,mest,itop,granet,magnitude,snip,grasp}.toml \
    configs/{agent_rigl,rigl_s2sam,rigl_sam,snip_s2sam}.toml \
    --grid sparsity.density=0.1,0.02 --seeds "$seeds" --jobs "$jobs" \
    --set 'logging.observers=["jsonl"]' --out "$out/unstructured"
# lottery: 4 rounds, 3 prunings of p: (1-p)^3 = 0.1 and 0.02
sparsefw sweep configs/lottery.toml \
    --grid mask_init.prune_fraction=0.536,0.729 --seeds "$seeds" --jobs "$jobs" \
    --set 'logging.observers=["jsonl"]' --out "$out/lottery"
sparsefw sweep configs/nm_{ste,srste,mdgf,sdgf,hybrid}_{2of4,1of8,1of16}.toml \
    --seeds "$seeds" --jobs "$jobs" --set 'logging.observers=["jsonl"]' --out "$out/nm"

for part in unstructured lottery nm; do
    mkdir -p "$docs/$part"
    for f in results.md results.csv summary.csv accuracy_vs_sparsity.png; do
        [ -f "$out/$part/$f" ] && cp "$out/$part/$f" "$docs/$part/$f"
    done
done
echo "tables written to $docs/"
