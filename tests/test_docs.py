"""The docs site builds strictly (a broken link, anchor, snippet or API reference fails),
and every link of the README points at a file of the repository."""

import os
import pathlib
import re
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_docs_build_strict(tmp_path):
  env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
  proc = subprocess.run(
    [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert (tmp_path / "site" / "api" / "index.html").read_text().count("doc-heading") > 50


def test_readme_links_resolve():
  text = (REPO / "README.md").read_text()
  links = [t for t in re.findall(r"\]\(([^)#\s]+)", text) if "://" not in t]
  assert links, "the README links to the docs"
  missing = [t for t in links if not (REPO / t).exists()]
  assert not missing, missing
