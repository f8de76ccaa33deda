"""Verified state (issue 30, items 4 and 5): corrupt checkpoints fall back to the previous
good step, corrupt encoders and chunks are named or recomputed, results.json is written
only beside its encoder, disk-full is one line and a clean resume, absurd sizes are
refused by their limit."""

import glob
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from rshash_jax import commands, errors, main as main_lib
from rshash_jax.data import chunk_store
from rshash_jax.retrieval import encoder as encoder_lib
from rshash_jax.training import train_dhcnn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))
import dhcnn as dhcnn_config  # noqa: E402  pylint: disable=g-import-not-at-top


def _tiny(epochs=4):
  c = dhcnn_config.get_config("tiny")
  c.data.generated_per_class = 6
  c.train.epochs = epochs
  c.train.checkpoint_every_steps = 2
  return c


def _flip(path, at=None, n=16):
  data = bytearray(open(path, "rb").read())
  at = len(data) // 2 if at is None else at
  for i in range(at, min(at + n, len(data))):
    data[i] ^= 0xFF
  open(path, "wb").write(bytes(data))


def _steps(ckpt):
  return sorted(int(d) for d in os.listdir(ckpt) if d.isdigit())


class _Records(logging.Handler):
  def __init__(self):
    super().__init__(logging.WARNING)
    self.lines = []

  def emit(self, record):
    self.lines.append(record.getMessage())

  @property
  def text(self):
    return "\n".join(self.lines)


@pytest.fixture
def warnings_logged():
  """WARNING records of absl's logger (where the package logs), whatever pytest does."""
  h = _Records()
  logging.getLogger("absl").addHandler(h)
  yield h
  logging.getLogger("absl").removeHandler(h)


# Three trainings in one process leave orbax/TensorStore callbacks that fire on a closed
# asyncio loop ("Event loop is closed", reported as unraisable at the end of the test);
# not seen with one or two runs per process, as the CLI runs.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_checkpoints_fall_back_to_the_previous_good_step(tmp_path, warnings_logged):
  caplog = warnings_logged
  wd = str(tmp_path / "w")
  first = train_dhcnn.train_and_evaluate(_tiny(), wd)
  ckpt = os.path.join(wd, "checkpoints")
  steps = _steps(ckpt)
  last = steps[-1]
  assert len(steps) == 2 and sorted(os.listdir(os.path.join(ckpt, "digests"))) == [
    f"{s}.json" for s in steps
  ]
  results = json.load(open(os.path.join(wd, "results.json")))
  meta = json.load(open(os.path.join(wd, "encoder", "encoder.json")))
  assert results["encoder"] == {"identity": meta["identity"], "sha256": meta["params_sha256"]}
  # Bytes flipped inside the latest step's largest data file: before, this restored silently.
  data_files = [f for f in glob.glob(f"{ckpt}/{last}/**/d/*", recursive=True) if os.path.isfile(f)]
  _flip(max(data_files, key=os.path.getsize))
  again = train_dhcnn.train_and_evaluate(_tiny(), wd)
  assert f"Checkpoint step {last} in {ckpt} is corrupt" in caplog.text
  assert os.listdir(os.path.join(ckpt, "corrupt"))[0].startswith(f"{last}.")
  # Resumed from the step before and retrained: the same run, bit for bit.
  assert again["step"] == first["step"] and again["map"] == first["map"]
  assert again["encoder"]["sha256"] == first["encoder"]["sha256"]
  # A truncated _METADATA (a JSONDecodeError traceback before): the same fallback.
  caplog.lines.clear()
  (meta_file,) = glob.glob(f"{ckpt}/{last}/**/_METADATA", recursive=True)
  with open(meta_file, "r+b") as f:
    f.truncate(os.path.getsize(meta_file) // 2)
  third = train_dhcnn.train_and_evaluate(_tiny(), wd)
  assert f"Checkpoint step {last}" in caplog.text and third["map"] == first["map"]
  assert third["encoder"]["sha256"] == first["encoder"]["sha256"]


def test_corrupt_encoders_are_refused_by_name(trained, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top

  _, workdir, _ = trained
  enc = str(tmp_path / "enc")
  shutil.copytree(os.path.join(workdir, "encoder"), enc)
  files = [f for f in glob.glob(f"{enc}/params/**/d/*", recursive=True) if os.path.isfile(f)]
  _flip(max(files, key=os.path.getsize))
  with pytest.raises(errors.Corrupt, match=r"enc/params: (the parameters do not match|cannot)"):
    encoder_lib.load_encoder(enc)
  shutil.rmtree(enc)
  shutil.copytree(os.path.join(workdir, "encoder"), enc)
  meta_path = os.path.join(enc, "encoder.json")
  meta = json.load(open(meta_path))
  for field, value in (("bits", None), ("image_size", "224"), ("bits", 10**8)):
    bad = dict(meta)
    if value is None:
      del bad[field]
    else:
      bad[field] = value
    json.dump(bad, open(meta_path, "w"))
    with pytest.raises(errors.Corrupt, match=f"encoder.json: (field '{field}'|bits=)"):
      encoder_lib.load_encoder(enc)
  open(meta_path, "w").write('{"format": ')
  with pytest.raises(errors.Corrupt, match="encoder.json: not valid JSON"):
    encoder_lib.load_encoder(enc)


def test_a_truncated_encode_chunk_is_recomputed(trained, tmp_path, monkeypatch):
  _, workdir, data = trained
  want = np.load(commands.encode(workdir, data, str(tmp_path / "clean.npz"), chunk=16))["codes"]
  out = str(tmp_path / "codes.npz")
  real = chunk_store.ChunkStore.write_chunk
  calls = []

  def dies_after_two(self, c, arrays):
    calls.append(c)
    if len(calls) > 2:
      raise KeyboardInterrupt("killed")
    real(self, c, arrays)

  monkeypatch.setattr(chunk_store.ChunkStore, "write_chunk", dies_after_two)
  with pytest.raises(KeyboardInterrupt):
    commands.encode(workdir, data, out, chunk=16)
  monkeypatch.setattr(chunk_store.ChunkStore, "write_chunk", real)
  part = os.path.join(out + ".parts", "chunks", "part_000000.npz")
  with open(part, "r+b") as f:
    f.truncate(os.path.getsize(part) - 40)
  np.testing.assert_array_equal(
    np.load(commands.encode(workdir, data, out, chunk=16))["codes"], want
  )


def test_a_store_that_fails_its_crc_is_rebuilt(tmp_path, warnings_logged):
  rows = lambda a, b: {
    "x": np.arange(a, b, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
  }
  store = chunk_store.ChunkStore(
    str(tmp_path / "s"), 10, {"x": ((3,), "float32")}, chunk=4, key="k"
  )
  want = np.array(store.build(rows)["x"])
  meta = json.load(open(tmp_path / "s" / chunk_store.META))
  assert set(meta["crc32"]) == {"x"}
  _flip(tmp_path / "s" / "x.npy", at=200, n=4)
  with pytest.raises(errors.Corrupt, match="x.npy: its contents do not match the CRC-32"):
    store.open()
  np.testing.assert_array_equal(store.build(rows)["x"], want)
  assert "rebuilding the store" in warnings_logged.text


def test_disk_full_is_one_line_and_a_clean_resume(trained, tmp_path):
  """A file-size limit (RLIMIT_FSIZE: writes past it fail with EFBIG, as on a full disk)."""
  _, workdir, data = trained
  out = str(tmp_path / "codes.npz")
  cmd = [sys.executable, "-m", "rshash_jax.main", "encode", f"--encoder={workdir}",
         f"--data={data}", f"--out={out}", "--chunk=16"]  # fmt: skip
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  limited = (
    "import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
    "resource.setrlimit(resource.RLIMIT_FSIZE, (600, 600)); "
    "sys.argv = sys.argv[1:]; runpy.run_module('rshash_jax.main', run_name='__main__')"
  )
  r = subprocess.run(
    [sys.executable, "-c", limited] + cmd[2:], env=env, capture_output=True, text=True,
    timeout=300, cwd=REPO,
  )  # fmt: skip
  last = r.stderr.strip().splitlines()[-1]
  assert r.returncode == 2, r.stderr[-3000:]
  assert last.startswith("rshash: error: cannot write") and "file too large" in last, last
  assert "Traceback" not in r.stderr and not os.path.exists(out)
  r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
  assert r.returncode == 0 and os.path.isfile(out), r.stderr[-3000:]


def test_storage_errors_are_recognised_through_wrapping():
  import errno  # pylint: disable=g-import-not-at-top

  inner = OSError(errno.ENOSPC, "No space left on device", "/w/checkpoints/4/d/abc")
  try:
    try:
      raise inner
    except OSError as e:
      raise RuntimeError("orbax: save failed") from e
  except RuntimeError as wrapped:
    assert main_lib.is_input_error(wrapped)
    assert main_lib.error_line(wrapped).startswith(
      "rshash: error: cannot write /w/checkpoints/4/d/abc: no space left on the device"
    )
  text = RuntimeError("tensorstore: Error writing file: [OS error 28: No space left on device]")
  assert errors.storage_error(text) is not None
  assert errors.storage_error(RuntimeError("a bug")) is None


def test_absurd_sizes_are_refused_by_their_limit(trained, tmp_path):
  c = dhcnn_config.get_config("tiny")
  c.model.bits = 100_000_000
  with pytest.raises(
    errors.TooLarge, match="config.model.bits=100000000 is over the limit of 4096"
  ):
    train_dhcnn.train_and_evaluate(c, str(tmp_path / "w"))
  c = dhcnn_config.get_config("tiny")
  c.train.batch_size = 10**9
  with pytest.raises(errors.TooLarge, match="train.batch_size=1000000000 is over the limit"):
    train_dhcnn.train_and_evaluate(c, str(tmp_path / "w2"))
  _, workdir, data = trained
  with pytest.raises(errors.TooLarge, match="--batch_size=100000000"):
    commands.encode(workdir, data, str(tmp_path / "c.npz"), batch_size=10**8)
