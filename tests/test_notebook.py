import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).parents[1] / "recipes" / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_runs(prepared_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NMT_QUICKSTART_DATA_DIR", str(prepared_dir))
    monkeypatch.setenv("NMT_QUICKSTART_STEPS", "5")
    monkeypatch.setenv("NMT_QUICKSTART_QAT_STEPS", "3")
    monkeypatch.setenv("NMT_QUICKSTART_IPQ_STEPS", "2")
    monkeypatch.setenv("NMT_QUICKSTART_KD_STEPS", "3")
    monkeypatch.setenv("NMT_QUICKSTART_PRUNE_ROUND_STEPS", "2")
    monkeypatch.setenv("NMT_QUICKSTART_D_MODEL", "32")
    monkeypatch.setenv("NMT_QUICKSTART_TEST_SENTENCES", "10")
    monkeypatch.setenv("PYTHONPATH", str(NOTEBOOK.parents[2]) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs)
    assert "->" in outputs and outputs.count("BLEU (cased)") == 5 and "int8: " in outputs and "iPQ: " in outputs
    assert "student: " in outputs and ", int8, " in outputs and "ticket: 80% of the weights pruned" in outputs
