"""notebooks/01_exam_logistic.ipynb runs from top to bottom (on a subset of schools)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).parent.parent / "notebooks" / "01_exam_logistic.ipynb"


def test_exam_notebook_executes(monkeypatch):
    monkeypatch.setenv("GLMM_JAX_NOTEBOOK_SMALL", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "Fixed effects:" in text and "school" in text
    # The caterpillar plot was drawn.
    assert any(
        "image/png" in o.get("data", {}) for o in outputs if o.get("output_type") == "display_data"
    )
    assert os.environ["GLMM_JAX_NOTEBOOK_SMALL"] == "1"
