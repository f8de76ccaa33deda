"""notebooks/quickstart.ipynb executes end to end on the tiny preset."""

import os

import nbformat
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
  monkeypatch.setenv("RSHASH_NOTEBOOK_PRESET", "tiny")
  monkeypatch.setenv("RSHASH_NOTEBOOK_WORKDIR", str(tmp_path / "nb"))
  monkeypatch.setenv("RSHASH_REPO", REPO)
  monkeypatch.setenv("XLA_FLAGS", "")  # the notebook trains: one CPU device, as a user would
  nb = nbformat.read(os.path.join(REPO, "notebooks", "quickstart.ipynb"), as_version=4)
  NotebookClient(
    nb,
    timeout=600,
    kernel_name="python3",
    resources={"metadata": {"path": os.path.join(REPO, "notebooks")}},
  ).execute()
  outputs = "".join(
    o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
  )
  assert "mAP=" in outputs and "relevant" in outputs
  assert (tmp_path / "nb" / "grid.png").exists()
  images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
  assert len(images) == 2
