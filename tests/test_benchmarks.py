"""The benchmark harness runs: bench scripts print records, run_all writes RESULTS.md.

Tiny shapes, JAX peers of the main venv only; results go to a temp dir. The torch-twin
check (marked slow) runs only where `bash benchmarks/envs.sh` has created .venv-torch.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
TORCH_PYTHON = REPO / ".venv-torch" / "bin" / "python"


@pytest.fixture
def run_all(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import run_all

    return run_all


def _records(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def _fake_record(run_all, lib: str, train_step_s: float) -> dict:
    return run_all.make_record(
        lib=lib,
        device="cpu",
        device_name="test CPU",
        workload="w1",
        batch=8,
        tiny=True,
        reps=2,
        train_step_s=train_step_s,
        infer_s=train_step_s / 2,
        compile_s=1.0,
        fwd_nfe=10,
        fwd_stop_rule="test",
        peak_mem_bytes=2**20,
        memory_kind="host_rss_delta",
        residual_trace=[1.0, 0.1, None, 1e-5],
        versions={"python": "3"},
    )


@pytest.mark.slow  # the harness test below runs the same script on every workload
def test_bare_jax_script_prints_one_record_per_workload(run_all):
    # w3 (the pytree state) and w2 share the conv code path; w1 runs in the next test
    completed = subprocess.run(
        [sys.executable, str(BENCH / "bench_bare_jax.py"), "--tiny"]
        + ["--workloads", "w2,w3", "--batches", "2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    records = _records(completed.stdout)
    assert [(r["workload"], r["batch"]) for r in records] == [("w2", 2), ("w3", 2)]
    for record in records:
        assert list(record) == list(run_all.RECORD_FIELDS)
        assert record["lib"] == "bare_jax" and record["tiny"] is True
        assert record["train_step_s"] > 0 and record["infer_s"] > 0
        assert 2 <= record["fwd_nfe"] <= 30
        assert 1 <= record["bwd_nfe"] <= 30
        assert record["time_per_fwd_iter_s"] == pytest.approx(
            record["infer_s"] / record["fwd_nfe"]
        )
        assert len(record["residual_trace"]) == record["fwd_nfe"]
        assert record["versions"]["jax"]


def test_harness_tiny_run_writes_results_to_out(run_all, tmp_path):
    real_results = BENCH / "RESULTS.md"
    before = real_results.read_bytes() if real_results.exists() else None
    completed = subprocess.run(
        [sys.executable, str(BENCH / "run_all.py"), "--tiny", "--workloads", "w1"]
        + ["--peers", "jaxdeq,bare_jax", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr[-3000:]
    if not (BENCH / "bench_jaxdeq.py").exists():
        assert "skipping jaxdeq: benchmarks/bench_jaxdeq.py" in completed.stdout
    records = _records((tmp_path / "results" / "records.jsonl").read_text())
    assert "bare_jax" in {r["lib"] for r in records}
    results = (tmp_path / "RESULTS.md").read_text()
    assert "| bare_jax |" in results and "### w1 · batch 4" in results
    assert (tmp_path / "results" / "residuals.png").stat().st_size > 0
    after = real_results.read_bytes() if real_results.exists() else None
    assert after == before


def test_peer_without_venv_is_skipped_with_a_reason(run_all):
    peer = run_all.Peer("ghost", "bench_bare_jax.py", ".venv-does-not-exist")
    assert "bash benchmarks/envs.sh" in peer.missing()
    assert "does not exist" in run_all.Peer("x", "bench_nothing.py", None).missing()


def test_ratios_are_taken_against_jaxdeq_when_present(run_all):
    records = [
        _fake_record(run_all, "bare_jax", 0.010),
        _fake_record(run_all, "torchdeq", 0.040),
    ]
    assert run_all.reference_lib(records) == "bare_jax"
    records.append(_fake_record(run_all, "jaxdeq", 0.011))
    rows = {row["peer"]: row for row in run_all.ratio_rows(records)}
    assert run_all.reference_lib(records) == "jaxdeq"
    assert rows["bare_jax"]["train"] == pytest.approx(1.1)
    assert rows["torchdeq"]["train"] == pytest.approx(0.275)
    text = run_all.render_results(records, "run_all.py --test", plots=[])
    assert "## Ratios: jaxdeq / peer" in text and "| 3.64x |" in text


def test_unknown_record_field_is_an_error(run_all):
    with pytest.raises(ValueError, match="nfe_typo"):
        run_all.make_record(lib="x", nfe_typo=3)


def test_merge_replaces_only_rerun_cells(run_all):
    old = [_fake_record(run_all, "bare_jax", 1.0), _fake_record(run_all, "banax", 2.0)]
    new = [_fake_record(run_all, "banax", 3.0)]
    merged = run_all.merge_records(old, new)
    assert sorted((r["lib"], r["train_step_s"]) for r in merged) == [
        ("banax", 3.0),
        ("bare_jax", 1.0),
    ]


@pytest.mark.slow
@pytest.mark.skipif(not TORCH_PYTHON.exists(), reason=".venv-torch not created")
def test_torch_twin_computes_the_same_cells(run_all, tmp_path):
    import jax

    import workloads

    paths = []
    for name in ("w1", "w2", "w3"):
        workload = workloads.get_workload(name, tiny=True)
        params = workload.init(jax.random.PRNGKey(0))
        x, _ = workloads.make_batch(workload, 3, jax.random.PRNGKey(1))
        injection = workload.inject(params["inject"], x)
        state = jax.tree.map(
            lambda leaf: jax.random.normal(
                jax.random.PRNGKey(2), leaf.shape, leaf.dtype
            ),
            workload.initial_state(injection),
        )
        out = workload.cell(params["cell"], state, injection)
        arrays = {
            f"param:{group}/{'/'.join(str(k.key) for k in path)}": np.asarray(leaf)
            for group in ("inject", "cell", "head")
            for path, leaf in jax.tree_util.tree_leaves_with_path(params[group])
        }
        arrays |= {
            f"z:{i}": np.asarray(s) for i, s in enumerate(jax.tree.leaves(state))
        }
        arrays |= {
            f"cell:{i}": np.asarray(o) for i, o in enumerate(jax.tree.leaves(out))
        }
        path = tmp_path / f"{name}.npz"
        np.savez(path, workload=name, tiny=True, x=x, injection=injection, **arrays)
        paths.append(str(path))
    completed = subprocess.run(
        [str(TORCH_PYTHON), str(BENCH / "workloads_torch.py"), "--check-twin", *paths],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr[-3000:]
    assert [r["workload"] for r in _records(completed.stdout)] == ["w1", "w2", "w3"]
