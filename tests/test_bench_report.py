"""scripts/bench/report.py: how a target's ratio of two paths is taken from a run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripts.bench import report


def test_a_peer_ratio_pairs_the_paths_rep_by_rep() -> None:
    # The machine got faster in rep 1. Within each rep a was 1.5x and 1.2x of b;
    # each path's best rep alone says 1.2x, whatever the other rep said.
    a = {"throughput_rps": 3000.0, "reps_rps": [1500.0, 3000.0]}
    b = {"throughput_rps": 2500.0, "reps_rps": [1000.0, 2500.0]}
    value, shown = report.paired_ratio(a, b)
    assert value == pytest.approx(1.35)
    assert shown == "1.35x (median of 2 reps: 1.50, 1.20; best reps 1.20x)"


def test_a_run_stored_without_its_reps_keeps_the_best_reps_ratio() -> None:
    assert report.paired_ratio({"throughput_rps": 300.0}, {"throughput_rps": 200.0}) == (
        1.5, "1.50x")
    uneven = {"throughput_rps": 300.0, "reps_rps": [300.0, 250.0]}
    assert report.paired_ratio(uneven, {"throughput_rps": 200.0, "reps_rps": [200.0]})[0] == 1.5
    assert report.paired_ratio({}, {"throughput_rps": 200.0}) == (None, "")
