"""The names of the engine's options, without torch: dtypes, attention backends, compile modes.

The parent process checks configuration values against these tuples and must not import
torch; the engine maps the same names to torch objects (``vnpd.compute.engine``,
``vnpd.compute.attention``, ``vnpd.compute.families.esm2``). Add a name here when the engine
learns a new choice, and the config accepts it.
"""

from __future__ import annotations

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
"""Dtypes the model may run in (``[model] dtype``)."""

OUTPUT_DTYPES = ("float32", "float16")
"""Dtypes the ``embeddings`` dataset may be stored as (``[model] output_dtype``)."""
