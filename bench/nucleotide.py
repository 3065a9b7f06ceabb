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

    python bench/nucleotide.py --case build --workers 1,2 --rounds 5 --contigs 60 --json OUT.json
The daemon's whole indexing step, ``NucleotideSource.build`` (read, check, make proteins,
write and index proteins.fasta), on a file of coding contigs: for each value of
``--workers``, genes with that ``gene_workers`` and six_frame with that
``six_frame_workers`` (``--proteins`` picks one mode), interleaved round by round so that
the load of a shared machine falls on every variant alike. Prints each run, then per
variant the median rows/s, contigs/s and kbp/s, and the ratio of each worker count's
median to the first's (and the median of the per-round ratios). ``cpu_seconds`` counts the
worker processes too (they are waited for before the clock stops). A vnpd from before
``six_frame_workers`` (put this script beside it) runs six_frame with ``--workers 1`` only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from vnpd.inputs.gene_calls import usable_cores
from vnpd.inputs.nucleotide import (
    FORWARD_CODONS,
    Protein,
    check_nucleotide,
    chunk_spans,
    gene_proteins,
    make_gene_finder,
    six_frame_proteins,
)
from vnpd.inputs.nucleotide_source import NucleotideSource
from vnpd.inputs.source import SourceSettings

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


def build_case(args: argparse.Namespace, lengths: tuple[int, int]) -> dict[str, object]:
    """``--case build``: NucleotideSource.build, genes per worker count and six_frame,
    interleaved over ``--rounds``; see the module doc."""
    workers = [int(w) for w in args.workers.split(",")]
    rng = random.Random(args.seed)
    contigs = [coding_contig(rng, rng.randint(*lengths), rng.uniform(0.4, 0.6))
               for _ in range(args.contigs)]
    bp = sum(len(c) for c in contigs)
    modes = ["genes", "six_frame"] if args.proteins == "both" else [args.proteins]
    variants = [(f"{mode}_w{w}", _settings(mode, args.chunk_length, w))
                for mode in modes for w in workers]
    work = Path(tempfile.mkdtemp(prefix="vnpd-bench-nt-"))
    runs: list[dict[str, object]] = []
    try:
        src = work / "contigs.fna"
        src.write_text("".join(f">contig{i}\n{c}\n" for i, c in enumerate(contigs)))
        if "genes" in modes:
            make_gene_finder()  # import pyrodigal-gv before the clock starts
        if "six_frame" in modes and max(workers) > 1:
            # as a daemon has it after its first large file (0.3 s, once)
            from vnpd.inputs.six_frame_pool import start_forkserver
            start_forkserver()
        for round_ in range(args.rounds):
            for name, settings in variants:
                out = work / name
                started, cpu = time.perf_counter(), _cpu_seconds()
                source = NucleotideSource.build(src, out, settings)
                seconds, cpu = time.perf_counter() - started, _cpu_seconds() - cpu
                shutil.rmtree(out)
                # cores_used: CPU seconds of all threads per wall second; below the worker
                # count when other processes hold the cores.
                row = {"round": round_, "variant": name, "seconds": seconds,
                       "cpu_seconds": cpu, "cores_used": cpu / seconds,
                       "load_avg_1min": os.getloadavg()[0],
                       "rows": source.num_rows, "rows_per_s": source.num_rows / seconds,
                       "contigs_per_s": len(contigs) / seconds, "kbp_per_s": bp / 1e3 / seconds}
                runs.append(row)
                print(json.dumps(_rounded(row)), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary: dict[str, dict[str, float]] = {}
    for name, _ in variants:
        mine = [r for r in runs if r["variant"] == name]
        summary[name] = {k: statistics.median(float(r[k]) for r in mine)  # type: ignore[arg-type]
                         for k in ("rows_per_s", "contigs_per_s", "kbp_per_s", "cores_used")}
    for mode in modes:
        base = f"{mode}_w{workers[0]}"
        for w in workers[1:]:
            name = f"{mode}_w{w}"
            per_round = [float(a["seconds"]) / float(b["seconds"])  # type: ignore[arg-type]
                         for a, b in zip([r for r in runs if r["variant"] == base],
                                         [r for r in runs if r["variant"] == name])]
            summary[name] |= {f"ratio_to_w{workers[0]}": summary[name]["rows_per_s"]
                              / summary[base]["rows_per_s"],
                              "ratio_per_round_median": statistics.median(per_round)}
    print(json.dumps({"summary": _rounded(summary)}), flush=True)
    return {"case": "build", "cpu": platform.processor() or platform.machine(),
            "usable_cores": usable_cores(), "python": platform.python_version(),
            "contigs": args.contigs, "length": lengths, "bp": bp, "rounds": args.rounds,
            "chunk_length": args.chunk_length, "runs": runs, "summary": summary}


def _settings(mode: str, chunk_length: int, workers: int) -> SourceSettings:
    """The build's settings, ``workers`` of either kind; a vnpd without six_frame_workers
    (before it existed) can only run six_frame in one thread."""
    if mode == "genes":
        return SourceSettings("nucleotide", "genes", gene_workers=workers)
    if "six_frame_workers" in {f.name for f in dataclasses.fields(SourceSettings)}:
        return SourceSettings("nucleotide", "six_frame", chunk_length, six_frame_workers=workers)
    if workers != 1:
        sys.exit("this vnpd has no six_frame_workers: run six_frame with --workers 1")
    return SourceSettings("nucleotide", "six_frame", chunk_length)


def _cpu_seconds() -> float:
    """CPU seconds of this process and of its children that have been waited for."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=["steps", "build"], default="steps",
                    help="steps: each translation step alone, one core; build: the indexing "
                         "step with 1 vs N workers")
    ap.add_argument("--contigs", type=int, default=40)
    ap.add_argument("--length", default="5000-50000", help="bp, 'L' or 'MIN-MAX'")
    ap.add_argument("--chunk-length", type=int, default=300)
    ap.add_argument("--workers", default="1,2",
                    help="build: gene_workers / six_frame_workers values, first = base")
    ap.add_argument("--proteins", choices=["both", "genes", "six_frame"], default="both",
                    help="build: the modes measured")
    ap.add_argument("--rounds", type=int, default=5, help="build: interleaved rounds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    low, _, high = args.length.partition("-")
    lengths = (int(low), int(high or low))
    if args.case == "build":
        result = build_case(args, lengths)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
        return

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
