"""Tests for vnpd/cache/key.py: sequence keys, namespaces, the memoised model hash."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from vnpd.cache import key as keymod
from vnpd.cache.key import MEMO_FILE, cache_namespace, model_content_hash, sequence_key

BASE = dict(model_hash="a" * 64, layers=[-1], dtype="bfloat16", output_dtype="float32",
            truncation=1022, long_sequences="truncate", window_stride=511, per_residue=False)

# One change per part of the key; each must give another namespace.
CHANGES = {
    "model_hash": "b" * 64,
    "layers": [-1, 20],
    "dtype": "float16",
    "output_dtype": "float16",
    "truncation": 1000,
    "long_sequences": "window",
    "window_stride": 256,
    "per_residue": True,
}


def test_sequence_key_is_sha256_of_upper_ascii() -> None:
    assert sequence_key("mkVL") == hashlib.sha256(b"MKVL").digest()
    assert sequence_key("mkvl") == sequence_key("MKVL")
    assert len(sequence_key("")) == 32
    with pytest.raises(ValueError):
        sequence_key("MKÜ")


def test_namespace_is_stable_and_readable() -> None:
    ns = cache_namespace(**BASE)
    assert ns == cache_namespace(**BASE)
    assert ns.startswith("vnpd-cache-v1;model=" + "a" * 64)
    assert "layers=-1;" in ns and "per_residue=0" in ns


@pytest.mark.parametrize("field", sorted(CHANGES))
def test_every_part_changes_the_namespace(field: str) -> None:
    assert cache_namespace(**{**BASE, field: CHANGES[field]}) != cache_namespace(**BASE)


def test_layer_order_matters() -> None:
    a = cache_namespace(**{**BASE, "layers": [-1, 20]})
    assert a != cache_namespace(**{**BASE, "layers": [20, -1]})


@pytest.mark.parametrize("field,value", [("dtype", "int8"), ("output_dtype", "bfloat16"),
                                         ("long_sequences", "slide"), ("layers", []),
                                         ("truncation", 0), ("model_hash", ""),
                                         ("model_hash", "x;layers=1")])
def test_bad_namespace_parts_raise(field: str, value: object) -> None:
    with pytest.raises(ValueError):
        cache_namespace(**{**BASE, field: value})


def test_model_hash_streams_and_memoises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = tmp_path / "esm2_test.pt"
    data = os.urandom(3 * (1 << 20) + 17)
    ckpt.write_bytes(data)
    memo_dir = tmp_path / "cache"
    expected = hashlib.sha256(data).hexdigest()
    assert model_content_hash(ckpt, memo_dir) == expected
    memo = json.loads((memo_dir / MEMO_FILE).read_text())
    assert memo[str(ckpt.resolve())]["sha256"] == expected

    # A new process (empty in-process memo) trusts the sidecar and reads no bytes.
    keymod._process_memo.clear()

    def no_rehash(path: Path) -> str:
        raise AssertionError("checkpoint rehashed although unchanged")

    monkeypatch.setattr(keymod, "_hash_file", no_rehash)
    assert model_content_hash(ckpt, memo_dir) == expected
    monkeypatch.undo()

    # Same size, same mtime, other bytes: the identity (ctime, inode) still changes.
    st = ckpt.stat()
    new = bytearray(data)
    new[100] ^= 0xFF
    tmp = tmp_path / "new.pt"
    tmp.write_bytes(bytes(new))
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(tmp, ckpt)
    assert model_content_hash(ckpt, memo_dir) == hashlib.sha256(bytes(new)).hexdigest()


def test_model_hash_without_memo_dir_and_damaged_memo(tmp_path: Path) -> None:
    ckpt = tmp_path / "m.pt"
    ckpt.write_bytes(b"weights")
    assert model_content_hash(ckpt) == hashlib.sha256(b"weights").hexdigest()
    (tmp_path / "memo").mkdir()
    (tmp_path / "memo" / MEMO_FILE).write_text("{not json")
    keymod._process_memo.clear()
    assert model_content_hash(ckpt, tmp_path / "memo") == hashlib.sha256(b"weights").hexdigest()


def test_missing_checkpoint_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        model_content_hash(tmp_path / "absent.pt", tmp_path)
