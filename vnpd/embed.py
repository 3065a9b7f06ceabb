"""`vnpd embed`: one FASTA file to one HDF5 file, in-process, with the daemon's engine.

The file is validated and indexed first (nothing is computed for a bad file), then read
again in windows of sequences; each window is packed by token budget and its batches
stream through the engine with two in flight. Rows land at their input positions in a
partial file beside the output, which is renamed over ``out`` only when complete.

Example::

    embed_file(Path("in.fasta"), Path("out.h5"), engine)
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from pathlib import Path
from typing import TextIO

import structlog
from tqdm import tqdm

from vnpd.compute.engine import Engine, PendingResult
from vnpd.compute.packing import build_batch, pack_batches
from vnpd.compute.tokenizer import tokens_for
from vnpd.inputs.index import index_fasta, iter_windows
from vnpd.output.hdf5 import OutputMeta, PartialOutput
from vnpd.output.outbox import fsync_dir

log = structlog.get_logger()

WINDOW_SEQUENCES = 100_000


def progress_bar(total: int, stream: TextIO | None = None) -> tqdm:
    """A tqdm bar over ``total`` sequences on ``stream`` (default stderr), silent unless a TTY.

    ``embed_file`` adds the token rate (``tok/s``) as the bar's postfix.
    """
    return tqdm(total=total, unit="seq", file=sys.stderr if stream is None else stream,
                disable=None, dynamic_ncols=True)  # None: disabled where not a TTY


def embed_file(src: Path, out: Path, engine: Engine, *, output_dtype: str = "float32",
               in_flight: int = 2, progress_stream: TextIO | None = None) -> int:
    """Embed every record of ``src`` into ``out`` atomically; returns the sequence count.

    A progress bar goes to ``progress_stream`` (default stderr) when it is a TTY.
    Raises :class:`vnpd.inputs.fasta.FastaError` (before any compute) for invalid input; ``out``
    is then untouched.
    """
    started = time.monotonic()
    out.parent.mkdir(parents=True, exist_ok=True)
    partial_path = out.with_name(f".{out.name}.partial-{os.getpid()}")
    index = index_fasta(src)
    n = index.num_records
    progress = progress_bar(n, progress_stream)
    progress_started, tokens_done = time.monotonic(), 0
    partial = PartialOutput.create(partial_path, n, engine.embed_dim, output_dtype)
    written = 0
    try:
        pending: deque[PendingResult] = deque()

        def drain_one() -> None:
            nonlocal written, tokens_done
            done = pending.popleft()
            rows = done.result()
            partial.write_rows(done.positions, rows)
            written += rows.shape[0]
            tokens_done += int(tokens_for(index.lengths[done.positions], engine.truncation).sum())
            elapsed = max(time.monotonic() - progress_started, 1e-9)
            progress.set_postfix_str(f"{tokens_done / elapsed:,.0f} tok/s", refresh=False)
            progress.update(rows.shape[0])

        for start, records in iter_windows(src, index, WINDOW_SEQUENCES):
            partial.write_ids_lengths(start, [r.id for r in records],
                                      index.lengths[start:start + len(records)])
            lengths = index.lengths[start:start + len(records)]
            for local in pack_batches(lengths, engine.max_tokens, engine.truncation):
                batch = build_batch(local + start, [records[i].sequence for i in local],
                                    engine.truncation)
                pending.append(engine.submit(batch))
                while len(pending) > in_flight:
                    drain_one()
        while pending:
            drain_one()
        if written != n:  # count in, count out
            raise RuntimeError(f"internal error: {n} sequences in, {written} rows out")
        partial.finalize(OutputMeta(
            model=engine.model_name, layer=engine.layer,
            dtype=str(engine.dtype).removeprefix("torch."), truncation=engine.truncation,
            attention_backend=engine.attention_backend, source_name=src.name,
            source_sha256=index.sha256))
        os.replace(partial_path, out)
        fsync_dir(out.parent)
    except BaseException:
        partial.close()
        partial_path.unlink(missing_ok=True)
        raise
    finally:
        progress.close()
    elapsed = time.monotonic() - started
    tokens = int(tokens_for(index.lengths, engine.truncation).sum())
    log.info("embed_done", source=str(src), output=str(out), sequences=n, tokens=tokens,
             seconds=round(elapsed, 3), tokens_per_s=round(tokens / max(elapsed, 1e-9), 1))
    return n

