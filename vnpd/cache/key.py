"""Cache keys: what identifies one cached embedding, and nothing less.

An entry is addressed by ``(namespace, sequence_key)``:

- ``sequence_key(residues)``: SHA-256 of the upper-cased residues as ASCII (32 bytes).
  Pass the residues exactly as the model sees them. In ``truncate`` mode that may be the
  truncated string (more sharing: two records that differ only past ``truncation`` give
  the same embedding); the namespace carries ``truncation`` either way, so both are correct.
- ``cache_namespace(...)``: a canonical string of every setting that changes the rows:
  the checkpoint's *content* hash (never its path), layers (in order: they set the row
  layout), compute dtype, output dtype, truncation, long-sequence mode, window stride and
  per-residue output. It errs on the side of missing: settings that happen not to matter
  for a given sequence (the stride under ``truncate``) still split the namespace, because
  a wrongly served entry is far worse than a recomputed one.

``model_content_hash(checkpoint, memo_dir)`` streams the checkpoint through SHA-256 once
and memoises the digest in ``<memo_dir>/model-hashes.json`` keyed by the file's resolved
path and its identity ``(st_dev, st_ino, size, mtime_ns, ctime_ns)``. ctime cannot be set
from user space, so replacing the file (``cp``, ``cp -p``, ``mv``, a re-download) always
forces a rehash, while a restart of the daemon on an unchanged 5.7 GB checkpoint costs one
``stat``. The memo lives beside the cache (the daemon passes ``<state>/cache``) because the
torch hub directory may be read-only.

Example::

    digest = model_content_hash(Path("esm2_t36_3B_UR50D.pt"), memo_dir=state / "cache")
    ns = cache_namespace(digest, layers=[-1], dtype="bfloat16", output_dtype="float32",
                         truncation=1022, long_sequences="truncate", window_stride=511,
                         per_residue=False)
    key = sequence_key("mkvl")   # == sequence_key("MKVL")
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

# Bump when the meaning or layout of cached rows changes (embedding semantics, value
# format): every entry written under an older version then simply stops matching.
NAMESPACE_VERSION = 1

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
OUTPUT_DTYPES = ("float32", "float16")
LONG_SEQUENCE_MODES = ("truncate", "window")
MEMO_FILE = "model-hashes.json"
_CHUNK = 8 << 20  # 8 MiB reads: large enough to stream at disk speed, small in memory

_memo_lock = threading.Lock()
_process_memo: dict[tuple[str, tuple[int, ...]], str] = {}


def sequence_key(residues: str) -> bytes:
    """SHA-256 (32 bytes) of the upper-cased residues encoded as ASCII.

    Raises ``UnicodeEncodeError`` (a ``ValueError``) for non-ASCII input.

    Example::

        sequence_key("mkv") == hashlib.sha256(b"MKV").digest()   # True
    """
    return hashlib.sha256(residues.upper().encode("ascii")).digest()


def cache_namespace(model_hash: str, layers: Sequence[int], dtype: str, output_dtype: str,
                    truncation: int, long_sequences: str, window_stride: int,
                    per_residue: bool) -> str:
    """A stable, human-readable string covering every setting that changes cached rows.

    Equal inputs give equal strings across processes and versions of Python; any change
    of any argument gives a different string. Raises ``ValueError`` for unknown dtypes or
    modes, an empty layer list, or a non-positive truncation or stride.

    Example::

        cache_namespace("ab12...", [-1, 20], "bfloat16", "float32", 1022, "window", 511, False)
        # 'vnpd-cache-v1;model=ab12...;layers=-1,20;dtype=bfloat16;output_dtype=float32;
        #  truncation=1022;long_sequences=window;window_stride=511;per_residue=0'
    """
    if not model_hash or any(c in model_hash for c in ";="):
        raise ValueError(f"model_hash must be a non-empty digest string, not {model_hash!r}")
    if not layers:
        raise ValueError("layers must name at least one layer")
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"dtype must be one of {COMPUTE_DTYPES}, not {dtype!r}")
    if output_dtype not in OUTPUT_DTYPES:
        raise ValueError(f"output_dtype must be one of {OUTPUT_DTYPES}, not {output_dtype!r}")
    if long_sequences not in LONG_SEQUENCE_MODES:
        raise ValueError(f"long_sequences must be one of {LONG_SEQUENCE_MODES}, "
                         f"not {long_sequences!r}")
    if int(truncation) <= 0 or int(window_stride) <= 0:
        raise ValueError("truncation and window_stride must be positive")
    parts = [
        f"vnpd-cache-v{NAMESPACE_VERSION}",
        f"model={model_hash}",
        "layers=" + ",".join(str(int(layer)) for layer in layers),  # order sets the row layout
        f"dtype={dtype}",
        f"output_dtype={output_dtype}",
        f"truncation={int(truncation)}",
        f"long_sequences={long_sequences}",
        f"window_stride={int(window_stride)}",
        f"per_residue={int(bool(per_residue))}",
    ]
    return ";".join(parts)


def _identity(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _read_memo(memo_path: Path) -> dict[str, dict[str, object]]:
    try:
        data = json.loads(memo_path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        # A damaged memo only costs a rehash; it must never stop the daemon.
        log.warning("model_hash_memo_unreadable", path=str(memo_path))
        return {}
    return data if isinstance(data, dict) else {}


def _write_memo(memo_path: Path, memo: dict[str, dict[str, object]]) -> None:
    memo_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo_path.with_name(f".{memo_path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(memo, indent=1, sort_keys=True))
    os.replace(tmp, memo_path)  # readers see the old memo or the new one, never half


def model_content_hash(checkpoint: Path, memo_dir: Path | None = None) -> str:
    """Hex SHA-256 of the checkpoint file's bytes, memoised by file identity.

    ``memo_dir``: where ``model-hashes.json`` lives (created if needed); ``None`` keeps the
    memo in this process only. The file is re-stat'ed after hashing and the digest is only
    memoised if its identity did not change meanwhile. Raises ``FileNotFoundError`` /
    ``OSError`` if the checkpoint cannot be read; a failure to write the memo is logged
    and ignored.

    Example::

        model_content_hash(Path("/models/esm2_t33_650M_UR50D.pt"), Path("/var/lib/vnpd/state/cache"))
        # 'c6a0...'  (64 hex digits); the second call only stats the file
    """
    path = checkpoint.resolve()
    ident = _identity(path.stat())
    memo_key = (str(path), ident)
    with _memo_lock:
        if memo_key in _process_memo:
            return _process_memo[memo_key]
    memo_path = memo_dir / MEMO_FILE if memo_dir is not None else None
    if memo_path is not None:
        row = _read_memo(memo_path).get(str(path))
        if row and tuple(row.get("identity", ())) == ident and isinstance(row.get("sha256"), str):
            digest = str(row["sha256"])
            with _memo_lock:
                _process_memo[memo_key] = digest
            return digest
    log.info("model_hash_started", path=str(path), size=ident[2])
    digest = _hash_file(path)
    if _identity(path.stat()) != ident:
        # The file changed while we read it: the digest describes no single version.
        log.warning("model_hash_file_changed", path=str(path))
        return model_content_hash(checkpoint, memo_dir)
    with _memo_lock:
        _process_memo[memo_key] = digest
    if memo_path is not None:
        try:
            memo = _read_memo(memo_path)
            memo[str(path)] = {"identity": list(ident), "sha256": digest}
            _write_memo(memo_path, memo)
        except OSError as exc:
            log.warning("model_hash_memo_not_written", path=str(memo_path), error=str(exc))
    log.info("model_hash_done", path=str(path), sha256=digest)
    return digest
