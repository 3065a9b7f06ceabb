"""Fault tolerance end to end: every scenario of tests/fault_scenarios.py, once, clean.

The scenarios (and their sequence accounting) live in tests/fault_scenarios.py, so that
bench/reliability.py can repeat them without importing this test file.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fault_scenarios import SCENARIOS, Reference

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def reference(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    return Reference(tiny_model, tmp_path_factory.mktemp("reference"))


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_fault_scenario(name: str, tmp_path: Path, tiny_model: Path,
                        reference: Reference) -> None:
    outcome = SCENARIOS[name](tmp_path, tiny_model, reference)
    if outcome.skipped:
        pytest.skip(outcome.skipped)
    assert outcome.ok, outcome.report()
    assert outcome.sequences > 0 and outcome.lost == outcome.duplicated == 0
