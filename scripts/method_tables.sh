#!/usr/bin/env bash
# Regenerates the method tables in docs/results/ from the recipes in configs/ on the embedded
# digits data: every unstructured pipeline and correction at 90% and 98% sparsity (the static
# control with both [sparsity] init values), the lottery
# ticket at about the same two densities, and the N:M recipes at 2:4, 1:8 and 1:16 — then
# compares each method with its base seed by seed (`sparsefw compare`): every unstructured
# method against static random sparsity, the corrections and perturbations against the
# pipeline they extend (RigL, SNIP), and every N:M method against plain STE at the same N:M.
# Compute is the effective-sparse FLOP estimate: it sees dense phases (GraNet, SDGF) that
# counting passes would not.
# Usage: bash scripts/method_tables.sh [SEEDS] [JOBS]   (about 15 minutes on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
seeds=${1:-2}
jobs=${2:-2}
out=runs/method-tables
docs=docs/results
mkdir -p "$docs"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
common=(--seeds "$seeds" --jobs "$jobs" --set 'logging.observers=["jsonl"]')
compare=(--compute flops)

sparsefw sweep configs/{static,static_sparse_init,set,rigl,dsr,mest,itop,granet,snfs,magnitude,snip,grasp}.toml \
    configs/{agent_rigl,agent_rigl_prev,agent_rigl_every3,rigl_s2sam,rigl_sam,snip_s2sam}.toml \
    --grid sparsity.density=0.1,0.02 "${common[@]}" --out "$out/unstructured"
for base in static rigl snip; do
    sparsefw compare "$out/unstructured" --base "$base" "${compare[@]}" \
        --out "$out/unstructured/vs-$base"
done
# lottery: 4 rounds, 3 prunings of p: (1-p)^3 = 0.1 and 0.02
sparsefw sweep configs/lottery.toml \
    --grid mask_init.prune_fraction=0.536,0.729 "${common[@]}" --out "$out/lottery"
for nm in 2of4 1of8 1of16; do
    sparsefw sweep configs/nm_{ste,srste,mdgf,sdgf,hybrid}_"$nm".toml "${common[@]}" \
        --out "$out/nm/$nm"
    sparsefw compare "$out/nm/$nm" --base "nm_ste_$nm" "${compare[@]}" --out "$out/nm/$nm/vs-ste"
done

copy() {  # copy SRC's tables and figures into DST
    mkdir -p "$2"
    for f in "$1"/*.md "$1"/*.csv "$1"/*.png; do
        [ -f "$f" ] && cp "$f" "$2/"
    done
    return 0
}
copy "$out/unstructured" "$docs/unstructured"
for base in static rigl snip; do
    copy "$out/unstructured/vs-$base" "$docs/unstructured/vs-$base"
done
copy "$out/lottery" "$docs/lottery"
for nm in 2of4 1of8 1of16; do
    copy "$out/nm/$nm" "$docs/nm/$nm"
    copy "$out/nm/$nm/vs-ste" "$docs/nm/$nm/vs-ste"
done
echo "tables written to $docs/"
