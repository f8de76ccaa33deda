"""Artefacts written by release 0.1.0 keep working: exported encoders (DHCNN, MrHash), a codes
file, and a training run stopped half-way (its checkpoints resume to the end).

tests/data/release_0_1_0/ was written by the 0.1.0 code (commit 0396787):
  python -m rshash_jax.main --config=configs/dhcnn.py:tiny --config.data.generated_per_class=4 \
      --config.train.epochs=3 --workdir=W/dhcnn   (and --config.train.max_steps_per_run=3 for
      dhcnn_stopped; configs/mrhash.py:tiny with generated_per_class=4 for mrhash)
  export --workdir=W/dhcnn --out=dhcnn_encoder; export --workdir=W/mrhash --out=mrhash_encoder
  encode --encoder=dhcnn_encoder --data=W/dhcnn/generated_data/... --out=codes.npz
expected.json holds what that code computed from them (under this suite's 8 fake devices);
RSHASH_WRITE_COMPAT=1 rewrites it, which only the release that wrote the artefacts may do.
"""

import json
import os
import pathlib
import shutil
import sys

import numpy as np

DATA = pathlib.Path(__file__).parent / "data" / "release_0_1_0"
EXPECTED = DATA / "expected.json"
REPO = pathlib.Path(__file__).resolve().parents[1]
QUERIES = [str(DATA / "queries" / "q0.png"), str(DATA / "queries" / "q1.png")]


def _codes_file_api():
  """load_codes and the query image loader of this code."""
  from rshash_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from rshash_jax.retrieval import codes as codes_lib  # pylint: disable=g-import-not-at-top

  return codes_lib.load_codes, input_pipeline.load_image


def _observed(tmp_path):
  import rshash_jax  # pylint: disable=g-import-not-at-top
  from rshash_jax import main as _  # noqa: F401  pylint: disable=g-import-not-at-top

  load_codes, load_image = _codes_file_api()
  out = {}
  for name in ("dhcnn_encoder", "mrhash_encoder"):
    enc = rshash_jax.load_encoder(str(DATA / name))
    images = np.stack([load_image(q, enc.image_size) for q in QUERIES])
    res = enc.encode(images)
    out[name] = {
      "identity": enc.identity,
      "bits": enc.bits,
      "codes": np.asarray(res["codes"]).tolist(),
      "predicted": np.asarray(res["predicted"]).tolist() if "predicted" in res else None,
    }
  enc = rshash_jax.load_encoder(str(DATA / "dhcnn_encoder"))
  db = load_codes(str(DATA / "codes.npz"), enc)
  out["codes_file"] = {
    "n": int(len(db["codes"])),
    "labels": np.asarray(db["labels"]).tolist(),
    "codes": np.asarray(db["codes"]).tolist(),
  }
  # The stopped run resumes from its step-3 checkpoint to the end (step 6).
  workdir = tmp_path / "dhcnn_stopped"
  shutil.copytree(DATA / "dhcnn_stopped", workdir)
  sys.path.insert(0, str(REPO / "configs"))
  import dhcnn as dhcnn_config  # pylint: disable=g-import-not-at-top

  c = dhcnn_config.get_config("tiny")
  c.data.generated_per_class = 4
  c.train.epochs = 3
  from rshash_jax.training import train_dhcnn  # pylint: disable=g-import-not-at-top

  res = train_dhcnn.train_and_evaluate(c, str(workdir))
  out["resumed"] = {"step": res["step"], "map": res["map"], "accuracy": res["accuracy"]}
  return out


def test_release_0_1_0_artefacts(tmp_path):
  got = _observed(tmp_path)
  if os.environ.get("RSHASH_WRITE_COMPAT"):
    EXPECTED.write_text(json.dumps(got, indent=1))
  want = json.loads(EXPECTED.read_text())
  for name in ("dhcnn_encoder", "mrhash_encoder"):
    assert got[name] == want[name], name
  assert got["codes_file"] == want["codes_file"]
  assert got["resumed"]["step"] == want["resumed"]["step"] == 6
  np.testing.assert_allclose(got["resumed"]["map"], want["resumed"]["map"], rtol=1e-6)
  np.testing.assert_allclose(got["resumed"]["accuracy"], want["resumed"]["accuracy"], rtol=1e-6)
