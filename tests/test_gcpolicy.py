"""The process's garbage-collection policy (broker.gcpolicy)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from broker import gcpolicy
from broker.config import Settings


def test_thresholds_keep_pythons_defaults_only_at_zero() -> None:
    assert gcpolicy.thresholds(0) is None
    assert gcpolicy.thresholds(20_000) == (20_000, *gcpolicy.OLDER)
    with pytest.raises(ValueError, match="--gc-threshold"):
        gcpolicy.thresholds(-1)


def test_the_default_collects_less_often_than_python() -> None:
    assert Settings().gc_threshold > 700


@pytest.mark.parametrize(("young", "expected"), [(0, "(700, 10, 10) 0"),
                                                 (5000, "(5000, 50, 1000) 1")])
def test_apply_and_settle_in_a_fresh_process(young: int, expected: str) -> None:
    # In a child: the test process's own collector stays as it is.
    code = ("import gc; from broker import gcpolicy; "
            f"gcpolicy.apply({young}); gcpolicy.settle({young}); "
            "print(gc.get_threshold(), int(gc.get_freeze_count() > 0))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout.strip()
    assert out == expected
