"""The daemon's window scratch (``window_slots``): a sidecar HDF5 file beside the partial.

In window mode each finished window of a long sequence is kept in a float32 slot until
its row is made at the end of the job (:mod:`vnpd.daemon.window_rows`). The slots never
go into the output, so they live in a file of their own, ``<partial>.slots.h5``: the
partial file then holds only what the output holds and is finalized in place (a scratch
dataset inside it would have to be dropped, which HDF5 can only do by writing every row
into a new file). :class:`vnpd.output.hdf5.PartialOutput` owns it: same create, flush
(fsync) and reopen as the partial file, removed once the output is finalized.

A partial file of an earlier version keeps its slots inside itself (dataset
``window_slots``): :meth:`WindowScratch.of` serves that dataset the same way, and such a
file is finalized by the copy that drops it.

Example::

    scratch = WindowScratch.create(scratch_path(partial), (12, 1280), plan=(1022, 511))
    scratch.write(np.array([3, 0]), values)
    scratch.flush()                    # durable with the partial file's rows
    WindowScratch.remove(scratch_path(partial))   # after finalize
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from vnpd.output.layout import early_alloc, open_h5
from vnpd.output.outbox import fsync_dir, fsync_file
from vnpd.output.schema import WINDOW_SLOTS


def scratch_path(partial: Path) -> Path:
    """The sidecar of a partial file: ``partial.h5`` -> ``partial.slots.h5``."""
    return partial.with_name(f"{partial.stem}.slots.h5")


class WindowScratch:
    """Slots of float32 values, slots first; ``plan`` is what numbers them (for a
    restart to check). ``file`` is the sidecar, or None when the slots are a dataset
    of the partial file itself (an earlier version's)."""

    def __init__(self, dset: h5py.Dataset, file: h5py.File | None) -> None:
        self._dset, self._file = dset, file
        self.shape: tuple[int, ...] = tuple(int(d) for d in dset.shape)
        self.plan: tuple[int, ...] = tuple(int(v) for v in dset.attrs["plan"])

    @property
    def inside(self) -> bool:
        """True for slots kept inside the partial file (an earlier version's)."""
        return self._file is None

    @classmethod
    def create(cls, path: Path, shape: tuple[int, ...], plan: tuple[int, ...]) -> WindowScratch:
        """Create (truncating) the sidecar with every slot allocated now, so a disk too
        full for it is found at job start; its layout is then fixed, as the partial's."""
        f = open_h5(path, "w")
        try:
            slots = f.create_dataset(WINDOW_SLOTS, shape, np.float32, dcpl=early_alloc(),
                                     fill_time="never")
            slots.attrs["plan"] = np.asarray(plan, dtype=np.int64)
            f.flush()
        except BaseException:
            try:
                f.close()
            except Exception:  # noqa: BLE001 - a file whose flush failed (full disk)
                pass
            raise
        return cls(slots, f)

    @classmethod
    def of(cls, partial: h5py.File, path: Path) -> WindowScratch | None:
        """The slots of an open partial file at ``path``: inside it, or its sidecar if that
        opens and is whole; None if neither (a sidecar cut short by a crash is none: the
        daemon then computes the job anew, as for any scratch of the wrong shape)."""
        if WINDOW_SLOTS in partial:
            return cls(partial[WINDOW_SLOTS], None)
        side = scratch_path(path)
        if not side.exists():
            return None
        try:
            f = open_h5(side, "r+")
        except OSError:
            return None
        try:
            if WINDOW_SLOTS in f and "plan" in f[WINDOW_SLOTS].attrs:
                return cls(f[WINDOW_SLOTS], f)
        except (OSError, KeyError, RuntimeError, ValueError):  # torn metadata: none
            pass
        f.close()
        return None

    def write(self, slots: np.ndarray, values: np.ndarray) -> None:
        order = np.argsort(np.asarray(slots, dtype=np.int64), kind="stable")
        for i in order.tolist():
            self._dset[int(slots[i])] = values[i]

    def read(self, start: int, stop: int) -> np.ndarray:
        return self._dset[start:stop]

    def flush(self) -> None:
        """Make every slot written so far durable (the partial file fsyncs itself)."""
        if self._file is not None:
            self._file.flush()
            fsync_file(Path(self._file.filename))

    def close(self) -> None:
        if self._file is not None and self._file.id.valid:
            self._file.close()

    @staticmethod
    def remove(path: Path) -> None:
        """Remove the sidecar ``path`` if there is one (its output is finalized)."""
        if path.exists():
            path.unlink()
            fsync_dir(path.parent)
