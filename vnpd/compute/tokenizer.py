"""The one alphabet: fair-esm's ESM-1b tokens, the truncation rule and token costs.

Everything that turns residues into token ids or counts tokens uses this module: packing,
the scheduler's budgets, the FASTA reader's residue check (``RESIDUE_LETTERS``) and the
config's truncation limit. It imports only numpy, so the parent process (which must not
import torch) can use it.

Example::

    encode("MKV")          # array([ 0, 20, 15,  7,  2])  (BOS, M, K, V, EOS)
    tokens_for([5, 2000])  # array([   7, 1024])          (truncated to 1022 + BOS + EOS)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

FAIR_ESM_TRUNCATION = 1022  # extract.py: 1024 positions minus BOS and EOS

# fair-esm ESM-1b alphabet: <cls>=0 <pad>=1 <eos>=2 <unk>=3, residues from 4, <mask>=32.
RESIDUE_LETTERS = "LAGVSERTIDPKQNFYMHWCXBUZO"
"""The residue letters in token order: the 20 standard amino acids plus X B U Z O."""
BOS_IDX, PAD_IDX, EOS_IDX = 0, 1, 2
_FIRST_RESIDUE_IDX = 4
_LOOKUP = np.full(256, -1, dtype=np.int64)
for _i, _c in enumerate(RESIDUE_LETTERS):
    _LOOKUP[ord(_c)] = _FIRST_RESIDUE_IDX + _i


def tokens_for(lengths: np.ndarray | int, truncation: int = FAIR_ESM_TRUNCATION) -> np.ndarray:
    """Token cost of sequences of the given residue lengths (BOS + kept residues + EOS)."""
    return np.minimum(np.asarray(lengths, dtype=np.int64), truncation) + 2


def encode(sequence: str, truncation: int = FAIR_ESM_TRUNCATION) -> np.ndarray:
    """Token ids (BOS, residues[:truncation], EOS) in fair-esm's ESM-1b alphabet.

    Raises ValueError on a character outside the residue alphabet (the FASTA reader
    rejects those before they get here).
    """
    body = _LOOKUP[np.frombuffer(sequence[:truncation].encode("ascii"), dtype=np.uint8)]
    if (body < 0).any():
        bad = sequence[int(np.argmax(body < 0))]
        raise ValueError(f"residue {bad!r} is not in the ESM-2 alphabet")
    out = np.empty(body.shape[0] + 2, dtype=np.int64)
    out[0], out[-1] = BOS_IDX, EOS_IDX
    out[1:-1] = body
    return out


def encode_packed(sequences: Sequence[str], truncation: int = FAIR_ESM_TRUNCATION
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Many sequences encoded as :func:`encode` does, concatenated: (tokens, cu_seqlens).

    ``tokens`` is int64, ``cu_seqlens`` int32 (n + 1 offsets: sequence i is
    ``tokens[cu[i]:cu[i + 1]]``). One pass in numpy, not one per sequence. Raises
    ValueError as :func:`encode` does.
    """
    kept = [s[:truncation] for s in sequences]
    lengths = np.fromiter(map(len, kept), dtype=np.int64, count=len(kept))
    return _encode(np.frombuffer("".join(kept).encode("ascii"), dtype=np.uint8), lengths)


def encode_spans(letters: np.ndarray, starts: np.ndarray, lengths: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Sequences given as spans of one array of residue letters (uint8 ASCII; sequence i
    is ``letters[starts[i]:starts[i] + lengths[i]]``, truncated already), encoded and
    concatenated as :func:`encode_packed` does: (tokens, cu_seqlens).

    Raises ValueError on a letter outside the residue alphabet.
    """
    starts = np.asarray(starts, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    before = np.cumsum(lengths) - lengths  # residues of the sequences before each
    return _encode(letters[np.arange(int(lengths.sum())) + np.repeat(starts - before, lengths)],
                   lengths)


def _encode(letters: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sequences of ``lengths`` residues, one after another in ``letters``: (tokens, cu)."""
    n = lengths.size
    cu = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(lengths + 2, out=cu[1:])
    body = _LOOKUP[letters]
    if (body < 0).any():
        bad = chr(int(letters[int(np.argmax(body < 0))]))
        raise ValueError(f"residue {bad!r} is not in the ESM-2 alphabet")
    tokens = np.empty(int(cu[-1]), dtype=np.int64)
    tokens[cu[:-1]] = BOS_IDX
    tokens[cu[1:] - 1] = EOS_IDX
    # Residue k of the whole body sits after the BOS and EOS of the sequences before it.
    tokens[np.arange(body.size) + np.repeat(2 * np.arange(n) + 1, lengths)] = body
    return tokens, cu
