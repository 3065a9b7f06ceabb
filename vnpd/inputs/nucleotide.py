"""Nucleotide input: the proteins vnpd embeds for a DNA record, and the checks on DNA text.

Two ways to turn one nucleotide record into proteins, both generators that hold nothing but
the current chunk or gene list besides the caller's sequence:

- ``six_frame_proteins``: VirNucPro's prediction path, quirks included, so that the
  embeddings equal the inputs its classifiers were trained on. The record is cut into
  ``chunk_length`` chunks as VirNucPro's ``split_fasta_chunk`` cuts it (``chunk_spans``),
  each chunk is upper-cased and translated in six frames with the standard code (NCBI
  table 1), codons with a base outside ACGT are dropped, and frames that contain a stop
  are dropped, as are empty ones.
- ``gene_proteins``: the genes that pyrodigal-gv's ``ViralGeneFinder(meta=True)`` calls,
  each translated with its own genetic code and without the trailing stop.

For a process pool (:mod:`vnpd.inputs.six_frame_pool`), ``piece_batches`` cuts records
into ``Piece`` runs of whole chunks and ``translate_pieces`` turns a batch of them into a
``TranslatedBlock``: the same proteins, as FASTA text and row arrays.

``check_nucleotide`` refuses text that is not DNA; ``looks_like_protein`` and
``looks_like_nucleotide`` are the heuristics that tell a protein file from a DNA file.

Example::

    for protein in six_frame_proteins("contig7", "ATGAAACCC...", chunk_length=300):
        protein.id, protein.sequence   # "contig7_chunk_1F1", "MKP..."
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from Bio.Data import CodonTable

if TYPE_CHECKING:  # imported where a gene finder is made: it costs the parent ~230 MB
    import pyrodigal_gv

from vnpd.inputs.fasta import NUCLEOTIDE_MIN_LENGTH, FastaRecord

PROTEIN_MIN_FRACTION = 0.25
"""A record of at least ``NUCLEOTIDE_MIN_LENGTH`` characters is taken for a protein when at
least this fraction of its characters (gaps aside) are not A C G T U N. Proteins have about
74% such letters (everything but Ala, Cys, Gly, Thr, Asn); DNA contigs carry IUPAC
ambiguity codes at well under 1%, so 25% leaves wide margins on both sides."""

IUPAC_NUCLEOTIDES = "ACGTRYKMSWBDHVN"
"""Letters accepted in nucleotide text, in either case: the bases and the IUPAC ambiguity
codes. ``U`` and gaps are refused: see ``check_nucleotide``."""


@dataclass(frozen=True, slots=True)
class Protein:
    """One protein to embed, and the region of its nucleotide record it came from.

    ``nt_start``/``nt_end`` are 0-based, half-open, on the forward strand of the *record*
    (not of the chunk), whatever ``strand`` is: ``record[nt_start:nt_end]`` is the region,
    and for ``strand == -1`` the protein is the translation of its reverse complement.
    The region spans the first to the last codon translated: codons dropped at the ends of
    a six-frame translation (non-ACGT bases) lie outside it, codons dropped in the middle
    lie inside it. So ``nt_end - nt_start == 3 * len(sequence)`` exactly when no codon
    inside was dropped. For genes it is the gene's span, stop codon included when the gene
    has one (Prodigal's coordinates), though the protein has no trailing ``*``.
    """

    id: str
    """Row id: ``<record>_chunk_<k>F1..F3 / R1..R3`` (six_frame) or ``<record>_<n>`` (genes)."""
    sequence: str
    """Protein residues, upper case."""
    source_id: str
    """Id of the nucleotide record."""
    strand: int
    """+1 (forward) or -1 (reverse complement)."""
    nt_start: int
    nt_end: int


class NucleotideError(ValueError):
    """Nucleotide text that vnpd refuses. ``str(e)`` says what is wrong and where in the
    sequence (``position`` is 1-based, None for whole-record problems); the caller adds the
    record and the line.

    Example: ``NucleotideError("invalid character 'J' at position 17 ...", position=17)``.
    """

    def __init__(self, reason: str, *, position: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.position = position


# --- checks on nucleotide text ---------------------------------------------------------

_INVALID = re.compile(f"[^{IUPAC_NUCLEOTIDES}{IUPAC_NUCLEOTIDES.lower()}]")
_ACGTUN = "ACGTUNacgtun"
_GAPS = "-."


def _count(sequence: str, characters: str) -> int:
    # str.count scans in C without a copy: a 100 Mbp contig is never duplicated here.
    return sum(sequence.count(c) for c in characters)


def looks_like_protein(sequence: str) -> bool:
    """True if ``sequence`` (either case) looks like protein text rather than DNA.

    It is at least ``NUCLEOTIDE_MIN_LENGTH`` (30) characters long, and at least
    ``PROTEIN_MIN_FRACTION`` (25%) of its characters, gaps ``-``/``.`` aside, are not
    A C G T U N. Shorter text is never called protein: it is too short to tell.

    Example: ``looks_like_protein("MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ")`` is True.
    """
    counted = len(sequence) - _count(sequence, _GAPS)
    if counted < NUCLEOTIDE_MIN_LENGTH:
        return False
    return (counted - _count(sequence, _ACGTUN)) / counted >= PROTEIN_MIN_FRACTION


def looks_like_nucleotide(sequence: str) -> bool:
    """True if ``sequence`` looks like DNA or RNA text rather than protein.

    The protein reader's rule (vnpd/fasta.py, docs/INPUT.md rule 13): at least
    ``NUCLEOTIDE_MIN_LENGTH`` (30) characters, all of them A C G T U N in either case.

    Example: ``looks_like_nucleotide("ACGT" * 10)`` is True; ``looks_like_nucleotide("ACGT")`` is False.
    """
    return len(sequence) >= NUCLEOTIDE_MIN_LENGTH and _count(sequence, _ACGTUN) == len(sequence)


def check_nucleotide(sequence: str) -> None:
    """Raise ``NucleotideError`` unless ``sequence`` is nucleotide text vnpd accepts.

    Accepted: ``IUPAC_NUCLEOTIDES`` (A C G T and the ambiguity codes R Y K M S W B D H V N)
    in either case; six_frame upper-cases each chunk as VirNucPro does. ``sequence`` must
    not contain whitespace (the FASTA reader removes it, ``\\r`` included).
    Refused, with a message naming the problem and its 1-based position:

    - an empty sequence;
    - ``U``: VirNucPro's codon table has no ``U``, so it silently drops every codon with a
      U, and pyrodigal reads U as an unknown base; vnpd refuses rather than embed that;
    - gaps ``-``/``.``: an alignment, not a contig; VirNucPro would count gaps as bases;
    - any other character; the message adds that the record looks like a protein when
      ``looks_like_protein`` says so;
    - text of valid letters that ``looks_like_protein`` (e.g. a protein without E F I L P Q).

    Example: ``check_nucleotide("ACGTNacgt")`` returns None; ``check_nucleotide("ACGU")``
    raises ``NucleotideError("'U' at position 4: ...")``.
    """
    if not sequence:
        raise NucleotideError("empty sequence")
    bad = _INVALID.search(sequence)
    if bad is None:
        if looks_like_protein(sequence):
            raise NucleotideError(f"this {_protein_hint(sequence)}; nucleotide sequences are expected here")
        return
    char, position = bad.group(), bad.start() + 1
    if char in "Uu":
        reason = (f"'{char}' at position {position}: RNA is not accepted; write T for U "
                  "(VirNucPro would drop every codon with a U)")
    elif char in _GAPS:
        reason = (f"gap '{char}' at position {position}: aligned sequences are not accepted; "
                  "remove the gaps")
    elif not char.isascii():
        reason = f"non-ASCII character {char!r} (U+{ord(char):04X}) at position {position}"
    else:
        reason = (f"invalid character {char!r} at position {position}: not a nucleotide or "
                  f"IUPAC code ({IUPAC_NUCLEOTIDES})")
    if looks_like_protein(sequence):
        reason += "; the record " + _protein_hint(sequence)
    raise NucleotideError(reason, position=position)


def _protein_hint(sequence: str) -> str:
    counted = len(sequence) - _count(sequence, _GAPS)
    other = counted - _count(sequence, _ACGTUN)
    return (f"looks like a protein sequence ({other} of {counted} characters are not "
            "A/C/G/T/U/N)")


# --- six_frame: VirNucPro's chunks x stop-free frames -----------------------------------

_STANDARD = CodonTable.unambiguous_dna_by_id[1]
_COMPLEMENT = str.maketrans("ACGT", "TGCA")
FORWARD_CODONS: dict[str, str] = {**_STANDARD.forward_table, **dict.fromkeys(_STANDARD.stop_codons, "*")}
"""The standard code (NCBI table 1) from Biopython: the 64 ACGT codons -> residue or ``*``."""
REVERSE_CODONS: dict[str, str] = {
    codon: FORWARD_CODONS[codon.translate(_COMPLEMENT)[::-1]] for codon in FORWARD_CODONS}
"""Forward-strand codon -> the residue its reverse complement codes for."""
_STOP_STRAND = {**{c: -1 for c, aa in REVERSE_CODONS.items() if aa == "*"},
                **{c: 1 for c, aa in FORWARD_CODONS.items() if aa == "*"}}
# The lookahead lets matches overlap: in TTAA both TTA (at 0) and TAA (at 1) are found.
_ANY_STOP = re.compile(f"(?=({'|'.join(_STOP_STRAND)}))")
_CODON = re.compile("...", re.DOTALL)


def chunk_spans(length: int, chunk_length: int) -> Iterator[tuple[int, int]]:
    """Yield the ``(start, end)`` of each chunk of a ``length``-bp record, 0-based half-open,
    exactly as VirNucPro's ``split_fasta_chunk`` cuts it.

    There are n = ceil(length / chunk_length) chunks (none for an empty record); chunk k
    (from 0) starts at ``k * chunk_length`` minus the overlaps of the boundaries before it.
    With spare = n * chunk_length - length, a boundary overlaps by ``spare // n`` bp, and by
    one more for the first ``spare - (spare // n) * (n - 1)`` boundaries. That count often
    reaches all n - 1 boundaries, so the overlaps sum to less than ``spare`` and the last
    chunk is shorter than ``chunk_length`` (for two chunks, whenever spare >= 3).

    Raises ValueError if ``chunk_length < 1``.
    Example: ``list(chunk_spans(301, 300))`` is ``[(0, 300), (150, 301)]``.
    """
    if chunk_length < 1:
        raise ValueError(f"chunk_length must be at least 1, not {chunk_length}")
    count = -(-length // chunk_length) if length > 0 else 0
    if count == 0:
        return
    spare = count * chunk_length - length
    whole = spare // count  # VirNucPro's int(spare / count): equal for any realistic size
    plus_one = spare - whole * (count - 1)
    for k in range(count):
        start = k * chunk_length - (k * whole + min(k, plus_one))
        yield start, min(start + chunk_length, length)


def six_frame_proteins(record_id: str, sequence: str, chunk_length: int) -> Iterator[Protein]:
    """Yield VirNucPro's proteins for one nucleotide record, in its order.

    ``sequence`` is the record's text (any case; see ``check_nucleotide`` for what is valid).
    For each chunk of ``chunk_spans`` (k from 1), the upper-cased chunk is translated in
    frames F1-F3 (offsets 0, 1, 2) then R1-R3 (offsets 0, 1, 2 of its reverse complement)
    with the standard code; a codon with a base outside ACGT is dropped (not X), and a frame
    is dropped if its protein has a stop or is empty. Ids are ``<record_id>_chunk_<k>F1`` ..
    ``R3``. Coordinates are on the record: see ``Protein``. Only one chunk is copied at a time.

    Raises ValueError if ``chunk_length < 1``.
    Example: ``next(six_frame_proteins("c", "ATGGCC", 300))`` is
    ``Protein("c_chunk_1F1", "MA", "c", 1, 0, 6)``.
    """
    for k, (start, end) in enumerate(chunk_spans(len(sequence), chunk_length), start=1):
        yield from chunk_proteins(record_id, k, sequence[start:end].upper(), start)


def chunk_proteins(record_id: str, number: int, chunk: str, start: int) -> Iterator[Protein]:
    """Yield the proteins of chunk ``number`` (from 1) of a record: the stop-free, non-empty
    frames of ``chunk``, its upper-cased text, which starts at record position ``start``.
    ``six_frame_proteins`` is this for each chunk of ``chunk_spans``.

    Example: ``next(chunk_proteins("c", 1, "ATGGCC", 0)).id`` is ``"c_chunk_1F1"``.
    """
    chunk_id, source_id = f"{record_id}_chunk_{number}", record_id
    # Reverse frame f reads, backwards, the same codons as the forward frame at offset
    # (len - f) % 3, so all six frames are found on the three forward codon grids.
    # Most frames of most chunks have a stop: find those first, in one scan that ends as
    # soon as all six have one, and split into codons only the grids still needed.
    stopped = _stopped_grids(chunk)
    grids: dict[int, list[str]] = {}
    for frame in range(3):
        if (frame, 1) not in stopped:
            codons = grids.setdefault(frame, _CODON.findall(chunk, frame))
            yield from _frame_protein(f"{chunk_id}F{frame + 1}", codons, FORWARD_CODONS, +1,
                                      source_id, start + frame)
    for frame in range(3):
        offset = (len(chunk) - frame) % 3
        if (offset, -1) not in stopped:
            codons = grids.setdefault(offset, _CODON.findall(chunk, offset))
            yield from _frame_protein(f"{chunk_id}R{frame + 1}", codons, REVERSE_CODONS, -1,
                                      source_id, start + offset)


def _stopped_grids(chunk: str) -> set[tuple[int, int]]:
    """(codon grid offset, strand) pairs whose frame has a stop: a forward stop codon, or
    the forward-strand text of a reverse one, starting at a position of that offset."""
    stopped: set[tuple[int, int]] = set()
    for match in _ANY_STOP.finditer(chunk):
        stopped.add((match.start() % 3, _STOP_STRAND[match.group(1)]))
        if len(stopped) == 6:
            break
    return stopped


def _frame_protein(protein_id: str, codons: list[str], table: dict[str, str], strand: int,
                   source_id: str, first_base: int) -> Iterator[Protein]:
    """Translate one frame's forward-strand ``codons`` (read backwards if ``strand`` is -1),
    the first of which starts at record position ``first_base``; yield nothing if empty."""
    ordered = codons if strand == 1 else codons[::-1]
    try:
        residues = "".join(map(table.__getitem__, ordered))
        first, last = 0, len(codons) - 1
    except KeyError:  # a codon with a base outside ACGT: VirNucPro drops it
        kept = [i for i, codon in enumerate(codons) if codon in table]
        if not kept:
            return
        picked = kept if strand == 1 else kept[::-1]
        residues = "".join(table[codons[i]] for i in picked)
        first, last = kept[0], kept[-1]
    if residues:
        yield Protein(protein_id, residues, source_id, strand,
                      first_base + 3 * first, first_base + 3 * last + 3)


# --- six_frame in pieces: the work units of vnpd.inputs.six_frame_pool -------------------

BATCH_PIECES = 2_000
"""Pieces (records, for short ones) per batch of ``piece_batches`` at most."""


@dataclass(frozen=True)
class Piece:
    """Consecutive chunks of one record: ``text`` is the record from ``start`` to the end of
    its last chunk, ``spans`` the chunks' (start, end) on the record, the first of them
    chunk ``first_chunk`` (from 1)."""

    record_index: int
    record_id: str
    first_chunk: int
    start: int
    text: str
    spans: list[tuple[int, int]]


@dataclass(frozen=True)
class TranslatedBlock:
    """The proteins of a batch of pieces, in order: ``text`` is their FASTA text (``>id``
    line, sequence line), and each array has one int64 (``strand``: int8) per protein:
    ``line_bytes`` (its bytes in ``text``), ``lengths`` (residues), ``source_index`` (the
    record's index in the file), ``strand``, ``nt_start`` and ``nt_end`` (on the record)."""

    text: bytes
    line_bytes: np.ndarray
    lengths: np.ndarray
    source_index: np.ndarray
    strand: np.ndarray
    nt_start: np.ndarray
    nt_end: np.ndarray


def translate_pieces(pieces: list[Piece]) -> TranslatedBlock:
    """The six_frame proteins of ``pieces``, as one block (run in a pool process).

    Example: ``translate_pieces([Piece(0, "c", 1, 0, "ATGGCC", [(0, 6)])]).text`` is
    ``b">c_chunk_1F1\\nMA\\n..."``.
    """
    lines: list[str] = []
    columns: dict[str, list[int]] = {name: [] for name in
                                     ("lengths", "source_index", "strand", "nt_start", "nt_end")}
    for piece in pieces:
        text = piece.text.upper()
        for number, (start, end) in enumerate(piece.spans, start=piece.first_chunk):
            chunk = text[start - piece.start:end - piece.start]
            for protein in chunk_proteins(piece.record_id, number, chunk, start):
                lines.append(f">{protein.id}\n{protein.sequence}\n")
                columns["lengths"].append(len(protein.sequence))
                columns["source_index"].append(piece.record_index)
                columns["strand"].append(protein.strand)
                columns["nt_start"].append(protein.nt_start)
                columns["nt_end"].append(protein.nt_end)
    data = "".join(lines).encode()
    line_bytes = [len(line) for line in lines]
    if sum(line_bytes) != len(data):  # ids with non-ASCII letters: bytes, not characters
        line_bytes = [len(line.encode()) for line in lines]
    arrays = {name: np.array(values, dtype=np.int8 if name == "strand" else np.int64)
              for name, values in columns.items()}
    return TranslatedBlock(data, np.array(line_bytes, dtype=np.int64), **arrays)


def piece_batches(records: Iterable[FastaRecord], chunk_length: int,
                  batch_bases: int) -> Iterator[list[Piece]]:
    """Consecutive pieces (``cut_pieces``) of ``records``, about ``batch_bases`` bases and
    at most ``BATCH_PIECES`` pieces a batch: the work units of a six_frame process pool.

    Example: ``next(piece_batches(records, 300, 300_000))`` is a list of ``Piece``.
    """
    batch: list[Piece] = []
    bases = 0
    for record in records:
        for piece in cut_pieces(record, chunk_length, batch_bases):
            batch.append(piece)
            bases += len(piece.text)
            if bases >= batch_bases or len(batch) >= BATCH_PIECES:
                yield batch
                batch, bases = [], 0
    if batch:
        yield batch


def cut_pieces(record: FastaRecord, chunk_length: int, max_bases: int) -> Iterator[Piece]:
    """``record`` as consecutive pieces of whole chunks (``chunk_spans``), each at most
    ``max_bases`` bases, or one chunk if a chunk is longer; one piece's text at a time.

    Example: ``[p.spans for p in cut_pieces(record_of_700_bp, 300, 450)]`` is
    ``[[(0, 300)], [(233, 533)], [(466, 700)]]``.
    """
    spans: list[tuple[int, int]] = []
    first = 1
    sequence = record.sequence
    for number, (start, end) in enumerate(chunk_spans(len(sequence), chunk_length), start=1):
        if spans and end - spans[0][0] > max_bases:
            yield Piece(record.index, record.id, first, spans[0][0],
                        sequence[spans[0][0]:spans[-1][1]], spans)
            spans, first = [], number
        spans.append((start, end))
    if spans:
        yield Piece(record.index, record.id, first, spans[0][0],
                    sequence[spans[0][0]:spans[-1][1]], spans)


# --- genes: pyrodigal-gv gene calls ----------------------------------------------------

def make_gene_finder() -> pyrodigal_gv.ViralGeneFinder:
    """The gene finder ``gene_proteins`` expects: pyrodigal-gv in metagenomic mode.

    It holds no per-record state and can be reused for every record of a job.
    Example: ``gene_proteins("phage1", dna, make_gene_finder())``.
    """
    import pyrodigal_gv

    return pyrodigal_gv.ViralGeneFinder(meta=True)


def gene_proteins(record_id: str, sequence: str,
                  finder: pyrodigal_gv.ViralGeneFinder) -> Iterator[Protein]:
    """Yield the proteins of the genes ``finder`` calls on one nucleotide record.

    ``sequence`` is the record's text (any case). Genes come in pyrodigal-gv's order (by
    position, Prodigal's convention) with ids ``<record_id>_<n>``, n from 1; each is
    translated with the genetic code pyrodigal-gv chose for it, without the trailing stop,
    codons with unknown bases as ``X`` (pyrodigal's default). ``nt_start``/``nt_end`` are
    Prodigal's 1-based inclusive ``begin``/``end`` made 0-based half-open; ``strand`` is
    the gene's (+1/-1).

    Example: ``next(gene_proteins("phage1", dna, make_gene_finder())).id`` is ``"phage1_1"``.
    """
    for number, gene in enumerate(finder.find_genes(sequence), start=1):
        yield Protein(f"{record_id}_{number}", gene.translate(include_stop=False), record_id,
                      gene.strand, gene.begin - 1, gene.end)
