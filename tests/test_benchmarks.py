"""The benchmark suite must not rot: every row runs in --smoke mode (tiny shapes, 2 rounds) and
writes its results. Nothing here is timed or compared; benchmarks/RESULTS.md holds the numbers."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = [f"B{i}" for i in range(1, 17)]


@pytest.mark.slow
def test_every_benchmark_row_runs_in_smoke_mode(tmp_path):
    pytest.importorskip("peft")
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "latest.json").read_text())
    assert result["profile"] == "smoke" and result["failed"] == []
    assert [row["id"] for row in result["rows"]] == ROWS
    for row in result["rows"]:
        assert row["times"], row["id"]
        for stats in row["times"].values():
            assert 0 < stats["min_ms"] <= stats["median_ms"] <= stats["max_ms"]
        for ratio in row["ratios"]:
            assert ratio["value"] > 0
    # the correctness checks hold even at smoke size: they are properties, not timings
    checks = {row["id"]: row["checks"] for row in result["rows"]}
    assert checks["B3"] == {"no hook or store left": True, "weights bit-identical": True}
    assert checks["B7"]["hookdelta bit-exact"] and checks["B6"]["exactly one adapter live"]
    assert checks["B12"]["same logits as peft"] and checks["B12"]["memory <= peft"]
    assert all(checks["B11"].values()) and len(checks["B11"]) == 2
    assert (
        checks["B13"] == {"same logits before and after": True, "same logits with siblings on and off": True}
        and checks["B15"]["same logits as peft"]
    )
    assert all(checks["B16"].values()) and len(checks["B16"]) == 3
    table = (tmp_path / "latest.md").read_text()
    assert all(f"| {row} |" in table for row in ROWS)


def test_an_unknown_row_is_refused():
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--smoke", "--only", "B99"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2 and "unknown rows ['B99']" in run.stderr


@pytest.mark.slow
def test_the_gpu_rows_run_in_another_dtype(tmp_path):
    """--device / --dtype reach every model the GPU rows build (here bf16 on the CPU)."""
    pytest.importorskip("peft")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.run",
            "--smoke",
            "--dtype",
            "bfloat16",
            "--only",
            "B1,B4,B11,B13,B14,B15,B16",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "latest.json").read_text())
    assert result["machine"]["dtype"] == "bfloat16" and result["failed"] == []


def test_the_distributed_row_runs():
    """benchmarks/distributed.py end to end at its smallest: one launch each, one process."""
    pytest.importorskip("peft")
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.distributed", "--sizes", "1", "--repeats", "1", "--steps", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    row = next(line for line in run.stdout.splitlines() if line.startswith("| 1 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[1]) > 0 and float(cells[2]) > 0 and float(cells[3]) > 0
