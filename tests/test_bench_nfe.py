"""Smoke test of benchmarks/bench_nfe.py: tiny W1, JAX solvers only (no torch)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_nfe_tiny_jax_solvers(tmp_path):
    completed = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "bench_nfe.py"),
            "--tiny",
            "--workloads",
            "w1",
            "--out",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    table = (tmp_path / "nfe.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| w1 ")]
    assert len(rows) == 4  # Anderson, Broyden, FixedPointIteration, Newton
    for row in rows:
        assert "| 100% |" in row  # every sample reached 1e-4 within 100
    assert (tmp_path / "nfe_residuals.png").stat().st_size > 0
