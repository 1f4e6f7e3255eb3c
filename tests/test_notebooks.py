"""Every tutorial in notebooks/ executes top to bottom (the zoo notebooks at tiny
settings), and the demo script runs and learns."""

import json
import pathlib
import subprocess
import sys

import nbclient
import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path, monkeypatch):
    # the kernel inherits the environment: the zoo notebooks then run tiny
    monkeypatch.setenv("JAXDEQ_NOTEBOOK_TINY", "1")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=900,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()
    images = [
        output
        for cell in nb.cells
        for output in cell.get("outputs", [])
        if "image/png" in output.get("data", {})
    ]
    assert images, f"{path.name} draws no plot"


def test_demo_script_runs_and_learns(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "digits.py"),
            "--epochs",
            "1",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "final test accuracy" in proc.stdout
    assert (tmp_path / "training.png").stat().st_size > 0
    (record,) = json.loads((tmp_path / "history.json").read_text())
    # one epoch: about 0.9 test accuracy (chance: 0.1), nearly every solve converged
    assert record["test_acc"] > 0.7
    assert record["test_converged"] >= 0.95
    assert "converged" in proc.stdout and "training time" in proc.stdout
