"""The notebooks run from top to bottom (on a subset of schools, or with few simulations)."""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).parent.parent / "notebooks"


def _execute(name: str, monkeypatch) -> tuple[str, list]:
    """Run a notebook in its folder with ``GLMM_JAX_NOTEBOOK_SMALL`` set: ``(stdout, outputs)``."""
    monkeypatch.setenv("GLMM_JAX_NOTEBOOK_SMALL", "1")
    path = NOTEBOOKS / name
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    return text, outputs


def _has_figure(outputs) -> bool:
    return any(
        "image/png" in o.get("data", {}) for o in outputs if o.get("output_type") == "display_data"
    )


def test_exam_notebook_executes(monkeypatch):
    text, outputs = _execute("01_exam_logistic.ipynb", monkeypatch)
    assert "Fixed effects:" in text and "school" in text
    assert _has_figure(outputs)  # the caterpillar plot


def test_power_notebook_executes(monkeypatch):
    text, outputs = _execute("02_power_analysis.ipynb", monkeypatch)
    assert "Power for a wald test of 'schavg'" in text
    # The small run's two sizes and the null check, each with 20 simulations.
    assert text.count(" 20 ") >= 3 and "   10 " in text and "   30 " in text
    assert _has_figure(outputs)  # the power curve
