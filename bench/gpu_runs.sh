#!/usr/bin/env bash
# The GPU measurements of the open issues, in sets that each fit one device call (10
# minutes, wheel install included; 2026-12-03: `ratios` took 9.5 minutes for its first
# three steps). Run from the repository root on the GPU machine, with the missing
# packages installed (docs/BENCHMARKS.md); results and logs go under $OUT.
#   bash bench/gpu_runs.sh ratios       # daemon / engine: 3B and 650M ORF, 3B UniProt
#   bash bench/gpu_runs.sh nucleotide   # daemon / engine: six_frame, genes (200 contigs)
#   bash bench/gpu_runs.sh outputs      # per-residue, window mode
#   bash bench/gpu_runs.sh parent       # the parent alone on this host's cores (no GPU)
#   bash bench/gpu_runs.sh profile      # per-residue again, the daemon and its workers under py-spy
#   bash bench/gpu_runs.sh genes        # genes (120 contigs), head start off then on
#   CONTIGS=400 HEAD=on bash bench/gpu_runs.sh genes  # 400 contigs, the default (auto) only
#   bash bench/gpu_runs.sh parent8      # the parent, 8 simulated workers, twice
#   SEQUENCES=6000 bash bench/gpu_runs.sh residues  # per-residue at one size
set -uo pipefail
W=${W:-/tmp/vnpd-gpu-runs}   # one work dir: the benches share each architecture's checkpoint
mkdir -p "$W" "$OUT"
step() {  # step NAME COMMAND...: run it; its output (less the daemon's log lines) goes to
    local name=$1; shift  # $OUT/all.log, one file: a call brings back at most 8
    echo "== $name $(date +%T)" | tee -a "$OUT/all.log"
    "$@" 2>&1 | grep -v '^20[0-9][0-9]-' | tee -a "$OUT/all.log"
}
case "${1:-}" in
ratios)
    step 3b-orf python3 bench/daemon.py --workload 3b-orf --sequences 16000 --files 4 \
        --workdir "$W" --json "$OUT/3b-orf.json"
    step 650m-orf python3 bench/daemon.py --workload 650m-orf --sequences 64000 --files 4 \
        --cache both --workdir "$W" --json "$OUT/650m-orf.json"
    step 3b-uniprot python3 bench/daemon.py --workload 3b-uniprot --sequences 8000 --files 4 \
        --workdir "$W" --json "$OUT/3b-uniprot.json"
    ;;
nucleotide)
    step nt-six-frame python3 bench/daemon.py --workload 3b-orf --kind nucleotide --contigs 400 \
        --files 4 --workdir "$W" --json "$OUT/nt-six-frame.json"
    step nt-genes python3 bench/daemon.py --workload 3b-orf --kind nucleotide --proteins genes \
        --contigs 200 --files 4 --workdir "$W" --json "$OUT/nt-genes.json"
    ;;
outputs)
    step residues python3 bench/outputs.py --case residues --workload 3b-uniprot --sequences 3000 \
        --workdir "$W" --json "$OUT/residues.json"
    step window python3 bench/outputs.py --case window --workload 3b-uniprot --sequences 1000 \
        --workdir "$W" --json "$OUT/window.json"
    ;;
parent)  # no GPU, no checkpoint
    step parent-8 python3 bench/parent.py --workers 8 --sequences 300000 --dim 2560 \
        --json "$OUT/parent-8.json"
    for w in 1 4 16 64; do
        step "parent-$w" python3 bench/parent.py --workers "$w" --sequences 50000 --dim 2560 \
            --json "$OUT/parent-$w.json"
    done
    ;;
profile)  # where per-residue loses 10% to the engine (needs py-spy: carry its wheel)
    mkdir -p "$OUT/spy"
    step residues-spy env VNPD_BENCH_PYSPY="$OUT/spy" python3 bench/outputs.py --case residues \
        --workload 3b-uniprot --sequences 2000 --workdir "$W" --json "$OUT/residues-spy.json"
    for raw in "$OUT"/spy/*.txt; do
        step "summary $(basename "$raw")" python3 bench/parent.py --summarise "$raw"
    done
    ;;
genes)
    step nt-genes-head python3 bench/daemon.py --workload 3b-orf --kind nucleotide --proteins genes \
        --contigs "${CONTIGS:-120}" --files 4 --head-start "${HEAD:-both}" --workdir "$W" \
        --json "$OUT/nt-genes-head.json"
    ;;
parent8)  # no GPU, no checkpoint
    for k in 1 2; do
        step "parent-8-$k" python3 bench/parent.py --workers 8 --sequences 300000 --dim 2560 \
            --json "$OUT/parent-8-$k.json"
    done
    ;;
residues)
    step "residues-${SEQUENCES:-6000}" python3 bench/outputs.py --case residues \
        --workload 3b-uniprot --sequences "${SEQUENCES:-6000}" --workdir "$W" \
        --json "$OUT/residues-${SEQUENCES:-6000}.json"
    ;;
*) echo "usage: bash bench/gpu_runs.sh ratios|nucleotide|outputs|parent|profile|genes|parent8|residues" >&2
   exit 2 ;;
esac
