"""Putting a finished file in the outbox: fsync, atomic publish without overwriting, names.

A finished file moves from state/ into the outbox by a hard link (``publish_atomically``),
so a reader of the outbox sees no file or a complete one, whenever a crash comes. Nothing
here knows HDF5: ``vnpd.output.hdf5`` writes the file, ``vnpd.output.verify`` checks it, and this
module puts it in place. ``fsync_file``, ``fsync_dir`` and ``link_without_replacing``
serve the other modules' files too (the inbox, the failure reports).

Example::

    output_name_for("sample.fasta")                              # "sample.h5"
    dest = unique_destination(outbox, "sample.h5")   # outbox/sample.h5, or sample.1.h5 if taken
    publish_atomically(state / "job7.h5", dest)      # FileExistsError if a racer took it
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import structlog

# One FASTA suffix is stripped from an input name to make the output name; any other
# suffix is kept, so "a.dat" and "a.seq2" do not both become "a.h5".
FASTA_SUFFIXES = (".fasta", ".fa", ".faa", ".fas", ".fna", ".ffn", ".fsa", ".mpfa",
                  ".pep", ".txt")

log = structlog.get_logger(__name__)


def fsync_file(path: Path, flags: int = os.O_RDONLY) -> None:
    """fsync a file (or, with O_DIRECTORY in ``flags``, a directory) by path."""
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """fsync a directory, so that names created or removed in it are durable."""
    fsync_file(path, os.O_RDONLY | os.O_DIRECTORY)


# errno values of link(2) on filesystems (or mounts) that do not do hard links.
_NO_HARD_LINKS = (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK)


def link_without_replacing(src: Path, dest: Path) -> None:
    """Give the file ``src`` the new name ``dest`` (same filesystem), never replacing a file.

    A hard link: an atomic create that fails if ``dest`` exists, unlike rename(2), and
    ``src`` keeps its name (the caller unlinks it once ``dest`` is durable). On filesystems
    without hard links it falls back to an existence check plus rename, and ``src`` is
    then gone. Raises FileExistsError if ``dest`` exists, and other OSErrors as link(2)
    and rename(2) raise them (EXDEV across filesystems). The inbox (``vnpd submit``) and
    the outbox (``publish_atomically``) both name files this way.
    """
    try:
        os.link(src, dest)
    except OSError as exc:  # FileExistsError (EEXIST) is re-raised here too
        if exc.errno not in _NO_HARD_LINKS:
            raise
        # A rename could replace a file created in the instant after this check; the
        # daemon owns its directories, so that window is accepted.
        if os.path.lexists(dest):
            raise FileExistsError(errno.EEXIST, "destination exists", str(dest)) from exc
        os.rename(src, dest)


def publish_atomically(src: Path, dest: Path) -> Path:
    """Move the finished file ``src`` to ``dest`` (same filesystem) without overwriting.

    ``src`` is fsynced, then hard-linked to ``dest`` (an atomic create that fails if
    ``dest`` exists), the directory fsynced, and ``src`` unlinked. A crash at any instant
    leaves either no ``dest`` or the complete file there. If a crash came between link
    and unlink, calling again finishes the job. Raises FileExistsError if ``dest`` is
    another file (see ``unique_destination``), FileNotFoundError if ``src`` is gone,
    and OSError (EXDEV) across filesystems. On filesystems without hard links it falls
    back to an existence check plus rename.
    """
    fsync_file(src)
    try:
        link_without_replacing(src, dest)
    except FileExistsError:
        if not os.path.samefile(src, dest):  # the same file: linked before a crash
            raise
    fsync_dir(dest.parent)
    if src.exists():
        src.unlink()
        fsync_dir(src.parent)
    log.info("output_published", path=str(dest))
    return dest


def unique_destination(outbox: Path, name: str) -> Path:
    """``outbox/name`` if free, else the first free ``stem.1.h5``, ``stem.2.h5``, ...

    Another writer may take the name before it is used: the caller retries on the
    ``FileExistsError`` that ``publish_atomically`` then raises (vnpd.daemon.completion does).
    """
    candidate = outbox / name
    stem, suffix = Path(name).stem, Path(name).suffix
    i = 0
    while os.path.lexists(candidate):
        i += 1
        candidate = outbox / f"{stem}.{i}{suffix}"
    return candidate


def output_name_for(source_name: str) -> str:
    """The output file name for an input file name.

    One known FASTA suffix (``FASTA_SUFFIXES``, any case) is replaced by ``.h5``; any
    other suffix is kept. "sample.fasta" -> "sample.h5", "x.fa.txt" -> "x.fa.h5",
    "reads.dat" -> "reads.dat.h5", "sample" -> "sample.h5", ".fa" -> ".fa.h5".
    """
    name = Path(source_name).name
    if not name:
        raise ValueError(f"no file name in {source_name!r}")
    lower = name.lower()
    for suffix in FASTA_SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)] + ".h5"
    return name + ".h5"
