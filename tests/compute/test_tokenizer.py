"""The one alphabet against fair-esm's: token ids, special indices and truncation."""

from __future__ import annotations

import numpy as np
import pytest
from esm.data import Alphabet

from vnpd.compute.tokenizer import (BOS_IDX, EOS_IDX, FAIR_ESM_TRUNCATION, PAD_IDX,
                                    RESIDUE_LETTERS, encode, tokens_for)
from vnpd.inputs.fasta import ALLOWED_RESIDUES


def test_alphabet_matches_fair_esm() -> None:
    alphabet = Alphabet.from_architecture("ESM-1b")
    assert (alphabet.cls_idx, alphabet.padding_idx, alphabet.eos_idx) == (BOS_IDX, PAD_IDX,
                                                                          EOS_IDX)
    assert [alphabet.get_idx(c) for c in RESIDUE_LETTERS] == list(range(4, 4 + 25))
    assert ALLOWED_RESIDUES == frozenset(RESIDUE_LETTERS)  # the reader accepts what encodes


def test_encode_matches_fair_esm_batch_converter() -> None:
    alphabet = Alphabet.from_architecture("ESM-1b")
    converter = alphabet.get_batch_converter(FAIR_ESM_TRUNCATION)
    seq = "ACDEFGHIKLMNPQRSTVWYXBUZO" * 50  # 1250 residues: truncated to 1022
    _, _, toks = converter([("a", seq)])
    np.testing.assert_array_equal(encode(seq), toks[0].numpy())


def test_encode_rejects_foreign_characters() -> None:
    with pytest.raises(ValueError, match="'J'"):
        encode("ACJ")


def test_tokens_for_counts_bos_and_eos_after_truncation() -> None:
    np.testing.assert_array_equal(tokens_for([5, 2000]), [7, FAIR_ESM_TRUNCATION + 2])
    np.testing.assert_array_equal(tokens_for(np.array([5, 2000]), truncation=10), [7, 12])
