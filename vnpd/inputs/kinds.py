"""The input kinds, by their ``[input] kind`` name: each a :class:`SequenceSource` beside this file.

A registry of its own, so that a kind's module can import the interface it implements.

Example: ``SOURCE_KINDS["nucleotide"].build(path, directory, settings)``.
"""

from __future__ import annotations

from vnpd.inputs.nucleotide_source import NucleotideSource
from vnpd.inputs.protein import ProteinSource
from vnpd.inputs.source import SequenceSource

SOURCE_KINDS: dict[str, type[SequenceSource]] = {
    "protein": ProteinSource, "nucleotide": NucleotideSource}
"""Input kinds by their ``[input] kind`` name."""
