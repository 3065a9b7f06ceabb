"""``vnpd submit``: put files into the inbox so that the daemon never sees one partial.

The writer side of the inbox contract (docs/INBOX.md): copy under a hidden ``.part`` name,
fsync, give the file its final name without ever replacing one, fsync the directory.

Example::

    submit_files([Path("a.fasta")], inbox)   # [inbox / "a.fasta"], or "a.1.fasta" if taken
"""

from __future__ import annotations

import errno
import os
import stat
import uuid
from collections.abc import Sequence
from pathlib import Path

from vnpd.daemon.inbox import is_candidate_name
from vnpd.output.outbox import fsync_dir, link_without_replacing, unique_destination

_COPY_CHUNK = 1 << 20


def _check_source(src: Path) -> None:
    st = os.stat(src)  # a symlink given by the user is theirs to follow
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, "is a directory, not a file; submit its files",
                                str(src))
    if not stat.S_ISREG(st.st_mode):
        raise OSError(errno.EINVAL, "not a regular file (FIFO, socket or device?)", str(src))
    if not is_candidate_name(src.name):
        raise OSError(errno.EINVAL, "the daemon ignores hidden, *.part and *.tmp names; "
                      "rename the file first", str(src))


def _copy_to_temp(src: Path, tmp: Path) -> None:
    # O_NONBLOCK: if src was swapped for a FIFO after the check, open must not hang.
    fd = os.open(src, os.O_RDONLY | os.O_NONBLOCK)
    with open(fd, "rb") as fin:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(src))
        os.set_blocking(fd, True)
        with open(tmp, "xb") as fout:
            while chunk := fin.read(_COPY_CHUNK):
                fout.write(chunk)
            fout.flush()
            os.fsync(fout.fileno())


def _publish_no_clobber(tmp: Path, inbox: Path, name: str) -> Path:
    """Give ``tmp`` a free final name without ever replacing an existing file."""
    while True:
        dest = unique_destination(inbox, name)
        try:
            link_without_replacing(tmp, dest)
        except FileExistsError:
            continue  # the name was taken meanwhile: take the next free one
        tmp.unlink(missing_ok=True)  # gone already if the fallback renamed it
        return dest


def submit_files(files: Sequence[Path], inbox: Path) -> list[Path]:
    """Put each file into ``inbox`` so the daemon never sees it partial; return final paths.

    For each file: copy to ``inbox/.<name>.<random>.part`` (hidden, ignored by the
    daemon), fsync it, give it its final name, then fsync the inbox. The copy makes this
    work from any filesystem. An existing name is never replaced: ``x.fasta`` becomes
    ``x.1.fasta``, ``x.2.fasta``, ... The copy gets a fresh mtime (settling starts now).

    All sources are checked before anything is copied. Raises OSError (``IsADirectoryError``
    for a directory) for a missing or non-regular source, or a name the daemon would
    ignore (hidden, ``*.part``, ``*.tmp``). A failed copy leaves no temp file behind.
    """
    # No log lines here: `vnpd submit` prints the final paths on stdout for scripts.
    sources = [Path(f) for f in files]
    for src in sources:
        _check_source(src)
    out = []
    for src in sources:
        tmp = inbox / f".{src.name[:200]}.{uuid.uuid4().hex[:12]}.part"
        try:
            _copy_to_temp(src, tmp)
            dest = _publish_no_clobber(tmp, inbox, src.name)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(inbox)
        out.append(dest)
    return out
