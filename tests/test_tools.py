"""encode / search / export / load_encoder on a tiny trained model."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import rshash_jax
from rshash_jax import commands
from rshash_jax.data import chunk_store
from rshash_jax.retrieval import codes as codes_lib
from rshash_jax.training import train_dhcnn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
import dhcnn as dhcnn_config  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_export_and_load_encoder_on_1_and_8_devices(trained):
  root, workdir, data = trained
  out = str(root / "exported")
  commands.export(workdir, out)
  with pytest.raises(FileExistsError, match="exported"):
    commands.export(workdir, out)
  imgs = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
  one = rshash_jax.load_encoder(out, devices=jax.local_devices()[:1]).encode(imgs)
  eight = rshash_jax.load_encoder(out, devices=jax.local_devices()[:8]).encode(imgs)
  np.testing.assert_array_equal(one["codes"], eight["codes"])
  np.testing.assert_array_equal(one["predicted"], eight["predicted"])
  assert one["codes"].shape == (5, 1) and one["codes"].dtype == np.uint32
  with pytest.raises(ValueError, match=r"expected uint8 images \[B, 32, 32, 3\]"):
    rshash_jax.load_encoder(out).encode(imgs[:, :16])


def test_encode_resumes_and_search_finds_own_class(trained, capsys, monkeypatch):
  root, workdir, data = trained
  fresh = commands.encode(workdir, data, str(root / "fresh.npz"), chunk=25)
  with pytest.raises(FileExistsError, match="fresh.npz"):
    commands.encode(workdir, data, str(root / "fresh.npz"))
  # Interrupt a run after its first chunk, then rerun: it continues at the missing chunks.
  out = str(root / "resumed.npz")
  real_write = chunk_store.ChunkStore.write_chunk
  written = []

  def write_then_die(self, c, arrays):
    if written:
      raise KeyboardInterrupt("simulated kill")
    real_write(self, c, arrays)
    written.append(c)

  monkeypatch.setattr(chunk_store.ChunkStore, "write_chunk", write_then_die)
  with pytest.raises(KeyboardInterrupt):
    commands.encode(workdir, data, out, chunk=25)
  monkeypatch.setattr(chunk_store.ChunkStore, "write_chunk", real_write)
  assert not os.path.exists(out)
  assert sorted(os.listdir(out + ".parts/chunks")) == ["key.json", "part_000000.npz"]
  with pytest.raises(ValueError, match="partial build of other data"):  # another chunking: refused
    commands.encode(workdir, data, out, chunk=10)
  commands.encode(workdir, data, out, chunk=25)
  np.testing.assert_array_equal(np.load(out)["codes"], np.load(fresh)["codes"])
  assert not os.path.exists(out + ".parts")

  query = sorted(
    os.path.join(data, "class03", f) for f in os.listdir(os.path.join(data, "class03"))
  )[0]
  res = commands.search(workdir, fresh, [query], k=5, png=str(root / "grid.png"))
  assert res[0]["results"][0]["distance"] == 0
  assert all(h["relevant"] for h in res[0]["results"])  # the tiny model separates the classes
  assert res[0]["predicted"] == "class03"
  assert os.path.getsize(root / "grid.png") > 1000
  assert "relevant" in capsys.readouterr().out
  with pytest.raises(FileExistsError, match="grid.png"):
    commands.search(workdir, fresh, [query], png=str(root / "grid.png"))


def test_search_with_a_multi_index_gives_the_scans_hits(trained, tmp_path):
  root, workdir, data = trained
  codes = commands.encode(workdir, data, str(tmp_path / "c.npz"))
  index = commands.build_index(codes, str(tmp_path / "idx"))
  with pytest.raises(FileExistsError, match="idx"):
    commands.build_index(codes, str(tmp_path / "idx"))
  queries = [os.path.join(data, c) for c in ("class01", "class04")]
  scan = commands.search(workdir, codes, queries, k=12)
  with open(os.path.join(index, "multi_index.json")) as f:
    crossover = json.load(f)["crossover"]  # measured here at build time
  n = len(np.load(codes)["codes"])
  assert [e["k"] for e in crossover["entries"]] == [10, min(100, n)]  # k <= archive size
  for engine in ("auto", "multi_index", "scan"):
    indexed = commands.search(workdir, codes, queries, k=12, index_path=index, index_engine=engine)
    assert [[(h["distance"], h["path"]) for h in r["results"]] for r in indexed] == [
      [(h["distance"], h["path"]) for h in r["results"]] for r in scan
    ]
  # An index of other codes is refused by name.
  z = dict(np.load(codes))
  z["codes"] = z["codes"][::-1].copy()
  np.savez(tmp_path / "other.npz", **z)
  other = commands.build_index(str(tmp_path / "other.npz"), str(tmp_path / "other_idx"))
  with pytest.raises(ValueError, match="was not built from the codes of"):
    commands.search(workdir, codes, queries, index_path=other)


def test_search_rejects_foreign_codes_and_bad_queries(trained, tmp_path):
  root, workdir, data = trained
  codes = commands.encode(workdir, data, str(tmp_path / "c.npz"))
  z = dict(np.load(codes))
  z["identity"] = np.asarray("0123456789abcdef")
  np.savez(tmp_path / "foreign.npz", **z)
  query = os.path.join(data, "class00", sorted(os.listdir(os.path.join(data, "class00")))[0])
  with pytest.raises(ValueError, match="re-encode the database"):
    commands.search(workdir, str(tmp_path / "foreign.npz"), [query])
  bad = tmp_path / "bad.png"
  bad.write_bytes(b"not a png")
  with pytest.raises(ValueError, match="bad.png"):
    commands.search(workdir, codes, [str(bad)])
  with pytest.raises(FileNotFoundError, match="missing.tif"):
    commands.search(workdir, codes, [str(tmp_path / "missing.tif")])


def test_cli_help_lists_commands():
  proc = subprocess.run(
    [sys.executable, "-m", "rshash_jax.main", "--help"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  for word in ("encode", "search", "export", "--encoder", "--codes"):
    assert word in proc.stdout


def test_cli_input_errors_are_one_line_and_exit_2(trained, tmp_path):
  """Each expected error through the real command line: one `rshash: error:` line naming
  the value or file, exit 2, no traceback; --traceback adds the trace; a bug keeps its
  traceback and exits 1. (An unreachable coordinator: test_multiprocess.py.)"""
  root, workdir, data = trained
  corrupt = tmp_path / "corrupt"
  for c in ("a", "b"):
    (corrupt / c).mkdir(parents=True)
    for i in range(2):
      (corrupt / c / f"{i}.png").write_bytes(
        open(
          os.path.join(data, "class00", sorted(os.listdir(os.path.join(data, "class00")))[i]), "rb"
        ).read()
      )
  (corrupt / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
  np.savez(
    tmp_path / "foreign.npz",
    format=codes_lib.FORMAT,
    identity="0123456789abcdef",
    bits=8,
    codes=np.zeros((1, 1), np.uint32),
  )
  (tmp_path / "exists.npz").write_bytes(b"")
  query = os.path.join(data, "class00", sorted(os.listdir(os.path.join(data, "class00")))[0])
  tiny = ["--config=configs/dhcnn.py:tiny", f"--workdir={tmp_path / 'w'}"]
  cases = {  # argv -> what the one line must say
    "bad value": (tiny + ["--config.model.bits=-3"], "config.model.bits=-3 is invalid"),
    "bad type": (tiny + ["--config.train.epochs=abc"], "flag --config.train.epochs=abc: "),
    "bad preset": (["--config=configs/dhcnn.py:bogus"], "unknown preset 'bogus'"),
    "unknown flag": (["--nosuch=1"], "Unknown command line flag 'nosuch'"),
    "missing dataset": (
      tiny + ["--config.data.source=folder:/no/such/dir"],
      "not found: /no/such/dir",
    ),
    "corrupt image": (
      ["encode", f"--encoder={workdir}", f"--data={corrupt}", f"--out={tmp_path / 'o.npz'}"],
      "broken.png",
    ),
    "foreign codes": (
      ["search", f"--encoder={workdir}", f"--codes={tmp_path / 'foreign.npz'}", query],
      "re-encode the database",
    ),
    "existing output": (
      ["encode", f"--encoder={workdir}", f"--data={data}", f"--out={tmp_path / 'exists.npz'}"],
      "exists, nothing overwritten",
    ),
    "usage": (["search", f"--encoder={workdir}"], "search needs --codes"),
    "with --traceback": (
      ["--traceback", "encode", "--encoder=/no/encoder", f"--data={data}", "--out=x.npz"],
      "not an exported encoder (no encoder.json): /no/encoder",
    ),
  }
  bug = (
    "import sys; from rshash_jax import commands, main\n"
    "def broken(*a, **k): raise KeyError('a bug')\n"
    "commands.export = broken; sys.argv = ['rshash', 'export', '--workdir=w', '--out=o']; "
    "main.run()"
  )
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  env.pop("RSHASH_TRACEBACK", None)
  procs = {
    name: subprocess.Popen(
      [sys.executable, "-m", "rshash_jax.main", *argv],
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for name, (argv, _) in cases.items()
  }
  procs["bug"] = subprocess.Popen(
    [sys.executable, "-c", bug],
    cwd=tmp_path,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  for name, proc in procs.items():
    _, err = proc.communicate(timeout=300)
    if name == "bug":
      assert proc.returncode == 1 and "Traceback" in err and "KeyError: 'a bug'" in err, err[-2000:]
      assert "rshash: error:" not in err
      continue
    last = err.strip().splitlines()[-1]
    assert proc.returncode == 2, (name, err[-2000:])
    assert last.startswith("rshash: error: ") and cases[name][1] in last, (name, last)
    assert ("Traceback" in err) == (name == "with --traceback"), (name, err[-2000:])
  assert not (tmp_path / "o.npz").exists() and (tmp_path / "exists.npz").read_bytes() == b""


def test_finetune_starts_from_a_frozen_runs_head(trained, tmp_path):
  root, workdir, data = trained
  c = dhcnn_config.get_config("tiny,finetune")
  c.data.generated_per_class = 10
  c.train.epochs = 1
  c.train.lr_start = c.train.lr_end = 1e-6  # (almost) no change: the head's quality carries over
  c.train.init_head_from = workdir
  res = train_dhcnn.train_and_evaluate(c, str(tmp_path / "ft"))
  assert res["accuracy"] > 0.9
  c.model.bits = 32
  with pytest.raises(ValueError, match="does not fit this model"):
    train_dhcnn.train_and_evaluate(c, str(tmp_path / "ft32"))
