"""Repeated rows of a job: keys, leaders and followers, against a plain dictionary."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import random_sequences, write_fasta
from vnpd.inputs.duplicates import (DuplicatePlan, key_list, plan_duplicates, plan_from_keys,
                                     row_key)
from vnpd.inputs.protein import ProteinSource
from vnpd.inputs.source import SourceSettings


def reference(sequences: list[str], truncation: int | None) -> tuple[list[int], dict[int, list[int]]]:
    """Leader of each row and the followers of each leader, the obvious way."""
    first: dict[str, int] = {}
    leaders, followers = [], {}
    for i, s in enumerate(sequences):
        kept = (s if truncation is None else s[:truncation]).upper()
        leader = first.setdefault(kept, i)
        leaders.append(leader)
        if leader != i:
            followers.setdefault(leader, []).append(i)
    return leaders, followers


def keys_of(sequences: list[str], truncation: int | None) -> np.ndarray:
    return np.stack([np.frombuffer(row_key(s, truncation), np.uint8) for s in sequences]) \
        if sequences else np.zeros((0, 32), np.uint8)


@pytest.mark.parametrize("seed", range(5))
def test_leaders_and_followers_match_a_dictionary(seed: int) -> None:
    rng = np.random.default_rng(seed)
    distinct = random_sequences([int(n) for n in rng.integers(1, 60, 40)], seed=seed)
    rows = [distinct[int(i)] for i in rng.integers(0, len(distinct), 300)]
    rows = [s.lower() if rng.random() < 0.2 else s for s in rows]  # case does not matter
    leaders, followers = reference(rows, None)
    plan = plan_from_keys(keys_of(rows, None))
    assert plan.leaders.tolist() == leaders
    assert plan.duplicate_rows == 300 - len(set(leaders))
    everything = np.arange(300)
    assert plan.is_leader(everything).tolist() == [leaders[i] == i for i in range(300)]
    got, which = plan.followers_of(everything)
    want = [f for p in range(300) for f in followers.get(p, [])]
    assert got.tolist() == want and [int(everything[w]) for w in which] == \
        [leaders[f] for f in want]


def test_truncation_decides_what_is_a_repeat() -> None:
    long_a, long_b = "M" * 30 + "A", "M" * 30 + "C"  # the same first 30 residues
    assert plan_from_keys(keys_of([long_a, long_b], 30)).duplicate_rows == 1
    assert plan_from_keys(keys_of([long_a, long_b], None)).duplicate_rows == 0
    assert row_key("mkv", None) == hashlib.sha256(b"MKV").digest()


def test_no_rows_and_no_repeats() -> None:
    assert plan_from_keys(keys_of([], None)).num_rows == 0
    plan = plan_from_keys(keys_of(["A", "C", "D"], None))
    assert plan.duplicate_rows == 0 and plan.followers_of(np.arange(3))[0].size == 0


def test_plan_of_a_source_saved_and_loaded(tmp_path: Path) -> None:
    seqs = random_sequences([5, 9, 5, 12, 9], seed=4)
    seqs = [seqs[0], seqs[1], seqs[0], seqs[3], seqs[1]]
    src = write_fasta(tmp_path / "a.fasta", seqs, prefix="r")
    source = ProteinSource.build(src, tmp_path / "index", SourceSettings())
    plan = plan_duplicates(source, truncation=1022)
    assert plan.leaders.tolist() == [0, 1, 0, 3, 1]
    plan.save(tmp_path / "index")
    assert DuplicatePlan.exists(tmp_path / "index")
    again = DuplicatePlan.load(tmp_path / "index")
    assert np.array_equal(again.keys, plan.keys) and again.followers.tolist() == [2, 4]


@pytest.mark.parametrize("truncation", [None, 1022, 7])
def test_keys_made_while_indexing_equal_keys_read_back(tmp_path: Path,
                                                      truncation: int | None) -> None:
    """ProteinSource.build_keyed keys rows in the indexing pass; the keys must be the
    ones plan_duplicates makes from the rows read back, whatever the file's layout."""
    rng = np.random.default_rng(11)
    distinct = random_sequences([1, 2, 7, 8, 60, 1023, 1500, 3000], seed=11)
    rows = [distinct[int(i)] for i in rng.integers(0, len(distinct), 60)]
    text = []
    for i, s in enumerate(rows):  # wrapped lines, lower case, stops, CRLF, comments
        body = s.lower() if i % 3 == 0 else s
        lines = [body[j:j + 60] for j in range(0, len(body), 60)]
        end = "\r\n" if i % 5 == 0 else "\n"
        stop = "*" if i % 4 == 0 else ""
        text.append(f">r{i} note{end}" + "".join(line + end for line in lines[:-1])
                    + lines[-1] + stop + end)
    path = tmp_path / "mixed.fasta"
    path.write_text(";an old-style comment\n" + "".join(text))
    source, keys = ProteinSource.build_keyed(path, tmp_path / "index", SourceSettings(),
                                             truncation)
    read_back = plan_duplicates(source, truncation)
    assert keys.shape == (60, 32)
    assert np.array_equal(keys, read_back.keys)
    leaders, _ = reference(rows, truncation)
    assert plan_from_keys(keys).leaders.tolist() == leaders


def test_key_list_gives_each_row_as_bytes() -> None:
    keys = keys_of(["A", "C", "A", "WWW"], None)
    listed = key_list(keys)
    assert listed == [bytes(k) for k in keys]
    assert listed[0] == listed[2] != listed[1]
    assert key_list(keys[[3, 0]]) == [bytes(keys[3]), bytes(keys[0])]  # gathered rows too
    assert key_list(np.zeros((0, 32), np.uint8)) == []
    with pytest.raises(ValueError):
        key_list(np.zeros((2, 16), np.uint8))
