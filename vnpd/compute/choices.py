"""The names of the engine's choices, without torch: dtypes, attention backends, compile modes.

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

AUTO = "auto"
"""The value of ``[model] attention`` and ``[model] compile_mode`` that lets the engine choose."""

ATTENTION_BACKENDS = ("flash_attn", "cudnn", "torch_varlen", "exact")
"""Attention backends in the engine's order of preference (``[model] attention`` forces one)."""

COMPILE_OFF = "off"
"""``[model] compile_mode`` for the eager forward (what ``VNPD_COMPILE=0`` asked for)."""

COMPILE_MODES = ("fused", "fused-torch-gemm", "ops", "layer", "layer-autotune")
"""How the packed forward is compiled (vnpd.compute.families.esm2 says what each does).
``auto`` means ``fused`` on CUDA and eager on the CPU."""
