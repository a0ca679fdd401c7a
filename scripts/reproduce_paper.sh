#!/usr/bin/env bash
# The paper's protocol (configs/paper/, Roulet & Harchaoui, TMLR 2023) at its full iteration budgets, both methods,
# three seeds, alignment logged: one `seqtp compare` per experiment into OUT/<experiment>/.
#   bash scripts/reproduce_paper.sh OUT [EXPERIMENT ...]     (default: the synthetic ones; add pixel_mnist
#                                                             permuted_mnist for MNIST, many CPU hours)
# Each compare resumes where it stopped (--resume), so the script can be re-run after a kill or a preemption.
set -euo pipefail
out=${1:?usage: scripts/reproduce_paper.sh OUT [EXPERIMENT ...]}
shift
experiments=("$@")
[ ${#experiments[@]} -gt 0 ] || experiments=(temporal_order_60 adding_30 temporal_order_120)
cd "$(dirname "$0")/.."
for name in "${experiments[@]}"; do
    config=configs/paper/$name.yaml
    [ -f "$config" ] || { echo "no such experiment: $config" >&2; exit 2; }
    resume=()
    [ -d "$out/$name" ] && resume=(--resume)
    seqtp compare "$config" --seeds 0,1,2 --set train.alignment_every=2000 --out "$out/$name" "${resume[@]}"
done
