"""CPU benchmark of nucleotide input: six_frame (VirNucPro's chunks x frames) and genes
(pyrodigal-gv, metagenomic mode), one process, so every figure is per CPU core.

Contigs are random, of realistic length (uniform 5-50 kbp) and GC (uniform 40-60%), in two
kinds, both measured:
  coding  phage-like: genes of 80-400 sense codons on both strands, short spacers. Viral
          contigs are this dense, and it is what gives six_frame its stop-free frames.
  random  uniform random bases: almost every 300-bp frame has a stop, so six_frame finds
          few proteins and pyrodigal-gv few genes.
  gc_only G and C only: no stop in any frame, six proteins per chunk, the most translation
          work six_frame can have per chunk (genes is not run on it).

Usage:
    python bench/nucleotide.py --contigs 40 --length 5000-50000 --chunk-length 300 --json OUT.json
Prints one JSON line per (kind, step) with how many cores keep one GPU busy: by proteins,
taking a 3B GPU at ~1,000 ORF-length proteins/s and a 650M GPU at ~3,700/s, and by tokens
(102.4k and 372k tokens/s; docs/BENCHMARKS.md). N GPUs need N times that.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from vnpd.inputs.nucleotide import (  # noqa: E402
    FORWARD_CODONS, Protein, check_nucleotide, chunk_spans, gene_proteins, make_gene_finder,
    six_frame_proteins)

GPU_PROTEINS_PER_S = {"3B": 1_000, "650M": 3_700}
"""ORF-length proteins/s one H200 embeds (docs/BENCHMARKS.md, vnpd engine)."""
GPU_TOKENS_PER_S = {"3B": 102_400, "650M": 372_000}
"""The same in tokens/s (residues + BOS/EOS): fairer for gene proteins, ~2.5x ORF length."""
_COMPLEMENT = str.maketrans("ACGT", "TGCA")


def random_contig(rng: random.Random, length: int, gc: float) -> str:
    return "".join(rng.choices("GCAT", weights=[gc, gc, 1 - gc, 1 - gc], k=length))


def gc_only_contig(rng: random.Random, length: int, gc: float) -> str:
    return "".join(rng.choices("GC", k=length))


def coding_contig(rng: random.Random, length: int, gc: float) -> str:
    """Genes (RBS, ATG, 80-400 sense codons, stop) on both strands, 20-120 bp spacers."""
    parts, size = [], 0
    while size < length:
        codons, wanted = [], rng.randint(80, 400)
        while len(codons) < wanted:
            codon = random_contig(rng, 3, gc)
            if FORWARD_CODONS[codon] != "*":
                codons.append(codon)
        gene = "AGGAGG" + random_contig(rng, 7, 0.3) + "ATG" + "".join(codons) + "TAA"
        if rng.random() < 0.5:
            gene = gene.translate(_COMPLEMENT)[::-1]
        parts += [random_contig(rng, rng.randint(20, 120), 0.3), gene]
        size += len(parts[-2]) + len(gene)
    return "".join(parts)[:length]


def measure(name: str, contigs: list[str], run: Callable[[str, str], tuple[int, list[Protein]]]) -> dict[str, float]:
    """Time ``run(record_id, contig)`` over every contig; it returns (chunks, proteins)."""
    chunks = proteins = tokens = 0
    started = time.perf_counter()
    for i, contig in enumerate(contigs):
        u, ps = run(f"contig{i}", contig)
        chunks += u
        proteins += len(ps)
        tokens += sum(min(len(p.sequence), 1022) + 2 for p in ps)  # fair-esm's truncation
    seconds = time.perf_counter() - started
    bp = sum(len(c) for c in contigs)
    row = {"step": name, "seconds": seconds, "bp_per_s": bp / seconds}
    if chunks:
        row |= {"chunks": chunks, "chunks_per_s": chunks / seconds}
    return row | {"proteins": proteins, "proteins_per_s": proteins / seconds,
                  "tokens_per_s": tokens / seconds,
                  "mean_protein_length": tokens / proteins - 2 if proteins else 0.0}


def _rounded(value: object) -> object:
    """Floats to 3 significant digits, in nested dicts too, for the printed line."""
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return float(f"{value:.3g}") if isinstance(value, float) else value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contigs", type=int, default=40)
    ap.add_argument("--length", default="5000-50000", help="bp, 'L' or 'MIN-MAX'")
    ap.add_argument("--chunk-length", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    low, _, high = args.length.partition("-")
    lengths = (int(low), int(high or low))

    finder = make_gene_finder()
    chunk = args.chunk_length

    def validate(rid: str, seq: str) -> tuple[int, list[Protein]]:
        check_nucleotide(seq)
        return 0, []

    def six_frame(rid: str, seq: str) -> tuple[int, list[Protein]]:
        return sum(1 for _ in chunk_spans(len(seq), chunk)), list(six_frame_proteins(rid, seq, chunk))

    def genes(rid: str, seq: str) -> tuple[int, list[Protein]]:
        return 0, list(gene_proteins(rid, seq, finder))

    result = {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
              "contigs": args.contigs, "length": lengths, "chunk_length": chunk, "rows": []}
    kinds = (("coding", coding_contig), ("random", random_contig), ("gc_only", gc_only_contig))
    for kind, make in kinds:
        rng = random.Random(args.seed)
        contigs = [make(rng, rng.randint(*lengths), rng.uniform(0.4, 0.6)) for _ in range(args.contigs)]
        steps = [("check_nucleotide", validate), ("six_frame", six_frame), ("genes", genes)]
        for step, run in steps[:2] if kind == "gc_only" else steps:
            row = {"kind": kind, **measure(step, contigs, run)}
            if step != "check_nucleotide" and row["proteins_per_s"]:
                # cores one GPU needs to be fed, counted in proteins and in tokens
                row["cores_per_gpu_by_proteins"] = {
                    m: rate / row["proteins_per_s"] for m, rate in GPU_PROTEINS_PER_S.items()}
                row["cores_per_gpu_by_tokens"] = {
                    m: rate / row["tokens_per_s"] for m, rate in GPU_TOKENS_PER_S.items()}
            result["rows"].append(row)
            print(json.dumps(_rounded(row)), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
