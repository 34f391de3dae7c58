"""Issue 16: every adversarial case gets a clear, early error or the correct result; nothing is lost.

The cases are data (``tests/_hardening_cases.py``); ``scripts/hardening_catalogue.py`` runs the same table and
writes ``docs/HARDENING.md`` from the outcomes. A failing ID names the case, e.g. ``eval-json-dev-null``.
"""

from __future__ import annotations

import pytest
from _hardening_cases import CASES, run_case
from _voc import single_thread  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_case(case, tmp_path):
    outcome = run_case(case, tmp_path)
    assert outcome.passed, f"{case.id} ({case.what}): {outcome.kind}: {outcome.message}"


def test_ids_are_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), sorted({i for i in ids if ids.count(i) > 1})
