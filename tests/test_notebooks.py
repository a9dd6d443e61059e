"""The example notebooks: committed without outputs, and they run from top to bottom (slow stage)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))


def test_there_is_a_quickstart() -> None:
    assert EXAMPLES / "quickstart.ipynb" in NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_are_committed_without_outputs(path: Path) -> None:
    cells = json.loads(path.read_text())["cells"]
    dirty = [
        i for i, c in enumerate(cells) if c["cell_type"] == "code" and (c["outputs"] or c["execution_count"])
    ]
    assert not dirty, f"{path.name}: clear the outputs of cells {dirty} (Kernel > Restart & Clear Output)"


@pytest.mark.slow
@pytest.mark.timeout(1800)  # about 2 minutes on a quiet 2-core machine; a loaded one is far slower
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_run(path: Path, tmp_path: Path) -> None:
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    # The kernel starts in tmp_path, so nothing a notebook writes lands in the repository; a cell
    # that raises fails the test with the cell's traceback.
    NotebookClient(
        notebook, timeout=1500, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    if path.name == "quickstart.ipynb":
        text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
        assert "keep 0.25: tokens after each block" in text
        assert "tome keep 0.50" in text and "random keep 0.25" in text
        figures = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
        assert len(figures) == 2  # the merge pictures and the accuracy-speed plot
