"""benchmarks/presa_vs_dpo.py: its figures (per-round ratios, their median and spread) and its CLI.

The measurement itself is not run here (minutes of CPU); its pure parts are checked by hand.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "presa_vs_dpo.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("presa_vs_dpo", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_round_ratios_by_hand(bench):
    run = {"presa": {"step_time_s": 1.2, "peak_memory_bytes": 110}, "dpo": {"step_time_s": 1.0, "peak_memory_bytes": 100},
           "kto": {"step_time_s": 0.5, "peak_memory_bytes": 90}}
    assert bench.round_ratios(run) == pytest.approx(
        {"step_time_ratio": 1.2, "peak_memory_ratio": 1.1, "two_trainer_ratio": 1.2 / 1.5})


def test_spread_median_quartiles_min_max(bench):
    assert bench.spread([5.0, 1.0, 4.0, 2.0, 3.0]) == {"median": 3.0, "min": 1.0, "q1": 2.0, "q3": 4.0, "max": 5.0,
                                                       "n": 5}
    assert bench.spread([1.0, 2.0]) == {"median": 1.5, "min": 1.0, "q1": 1.25, "q3": 1.75, "max": 2.0, "n": 2}
    assert bench.spread([0.9]) == {"median": 0.9, "min": 0.9, "q1": 0.9, "q3": 0.9, "max": 0.9, "n": 1}


def test_table_lists_every_ratio_with_its_spread(bench):
    s = {"median": 1.0, "min": 0.9, "q1": 0.95, "q3": 1.05, "max": 1.1, "n": 5}
    table = bench.table({"tiny": {"ratio_spread": {name: s for name in bench.RATIOS}}}, markdown=True)
    lines = table.splitlines()
    assert lines[0] == "| model | ratio | median | min | q1 | q3 | max | rounds |"
    assert len(lines) == 2 + 3 and "| tiny | step time PRESA / DPO | 1.000 | 0.900 | 0.950 | 1.050 | 1.100 | 5 |" in lines


def test_cli_protocol_defaults_and_kebab_flags(bench):
    args = bench.build_parser().parse_args([])
    assert (args.rounds, args.threads) == (bench.PROTOCOL_ROUNDS, bench.PROTOCOL_THREADS) == (5, 2)
    assert bench.build_parser().parse_args(["--max-length", "64"]).max_length == 64
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--rounds" in out.stdout and "--threads" in out.stdout
    bad = subprocess.run([sys.executable, str(SCRIPT), "--rounds", "0"], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "--rounds must be >= 1" in bad.stderr
