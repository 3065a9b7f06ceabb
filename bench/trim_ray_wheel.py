"""Trim Ray's wheel to what ``ray.init()`` and actors load, so that it can be carried to
the GPU machine in one piece (the untrimmed wheel is ~79 MB; a carry holds 64 MiB).

Removed: the Java jars (31 MB compressed), the dashboard's web client, and the libraries
vnpd never imports (rllib, tune, train, serve, data, llm). Kept: ``ray/core`` (the GCS
and raylet binaries), ``_raylet.so``, ``_private``, ``dashboard`` (its agent runs on every
node, in minimal mode), ``autoscaler``, ``util`` and the rest. The ``RECORD`` drops the
removed files, so pip installs the result like any wheel. The file name is unchanged.

Usage::

    python bench/trim_ray_wheel.py ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl OUT_DIR
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

DROP = ("ray/jars/", "ray/dashboard/client/", "ray/rllib/", "ray/tune/", "ray/train/",
        "ray/serve/", "ray/data/", "ray/llm/")


def dropped(name: str) -> bool:
    return name.startswith(DROP) or "/tests/" in name


def trim_wheel(wheel: Path, out_dir: Path) -> Path:
    """Write the trimmed copy of ``wheel`` into ``out_dir``; returns its path."""
    out = out_dir / wheel.name
    assert out.resolve() != wheel.resolve(), "write the trimmed wheel somewhere else"
    with zipfile.ZipFile(wheel) as src, \
            zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
        for info in src.infolist():
            if dropped(info.filename):
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(l for l in lines if not dropped(l.split(",", 1)[0])).encode()
            dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    return out


if __name__ == "__main__":
    source, target = Path(sys.argv[1]), Path(sys.argv[2])
    target.mkdir(parents=True, exist_ok=True)
    result = trim_wheel(source, target)
    print(f"{result}: {source.stat().st_size / 2**20:.1f} MiB -> "
          f"{result.stat().st_size / 2**20:.1f} MiB")
