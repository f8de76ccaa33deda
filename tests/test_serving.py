"""SavedModel export (read back by TensorFlow alone) and the HTTP search service."""

import concurrent.futures
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import rshash_jax
from rshash_jax import commands
from rshash_jax.data import input_pipeline
from rshash_jax.serving import saved_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in a fresh interpreter where importing jax fails: the SavedModel needs TensorFlow only.
_TF_ONLY = r"""
import json, sys
class _NoJax:
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in ("jax", "jaxlib", "flax", "rshash_jax"):
      raise ImportError("blocked in this test: " + name)
sys.meta_path.insert(0, _NoJax())
import numpy as np
import tensorflow as tf
args = json.loads(sys.argv[1])
m = tf.saved_model.load(args["model"])
raw = [open(p, "rb").read() for p in args["files"]]
by_bytes = m.signatures["encoded"](image_bytes=tf.constant(raw))
by_pixels = m.signatures["serving_default"](images=tf.constant(np.load(args["pixels"])))
np.savez(args["out"], **{"bytes_" + k: v.numpy() for k, v in by_bytes.items()},
         **{"pixels_" + k: v.numpy() for k, v in by_pixels.items()})
assert not any(n.split(".")[0] in ("jax", "jaxlib") for n in sys.modules)
"""


def test_saved_model_reproduces_load_encoder_with_tensorflow_alone(trained, tmp_path):
  root, workdir, data = trained
  out = str(tmp_path / "sm")
  assert saved_model.export_saved_model(workdir, out) == out
  with pytest.raises(FileExistsError, match="export path exists"):
    saved_model.export_saved_model(workdir, out)
  enc = rshash_jax.load_encoder(workdir)
  meta = json.load(open(os.path.join(out, "assets.extra", "encoder.json")))
  assert meta["identity"] == enc.identity and meta["bits"] == enc.bits
  # Files of the archive (PNG), and raw pixels of another size than the model's input.
  files = [
    os.path.join(data, c, sorted(os.listdir(os.path.join(data, c)))[0])
    for c in ("class00", "class03")
  ]
  pixels = np.random.default_rng(0).integers(0, 256, (3, 45, 61, 3), dtype=np.uint8)
  np.save(tmp_path / "pixels.npy", pixels)
  args = dict(
    model=out, files=files, pixels=str(tmp_path / "pixels.npy"), out=str(tmp_path / "tf.npz")
  )
  env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
  proc = subprocess.run(
    [sys.executable, "-c", _TF_ONLY, json.dumps(args)],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = np.load(tmp_path / "tf.npz")
  want_files = enc.encode(np.stack([input_pipeline.load_image(p, enc.image_size) for p in files]))
  want_pixels = enc.encode(
    np.stack([input_pipeline.resize(p, enc.image_size).numpy() for p in pixels])
  )
  for prefix, want in (("bytes_", want_files), ("pixels_", want_pixels)):
    np.testing.assert_array_equal(got[prefix + "codes"], want["codes"])  # bit for bit
    np.testing.assert_array_equal(got[prefix + "predicted"], want["predicted"])
    np.testing.assert_allclose(got[prefix + "logits"], want["logits"], rtol=1e-5, atol=1e-5)
    assert got[prefix + "codes"].dtype == np.uint32


# --- the search service ----------------------------------------------------------------


@pytest.fixture(scope="module")
def service(trained, tmp_path_factory):
  """(engine, app, data): the service over the tiny model's codes of its own archive."""
  from rshash_jax.serving import service as service_lib  # pylint: disable=g-import-not-at-top

  root, workdir, data = trained
  codes = commands.encode(workdir, data, str(tmp_path_factory.mktemp("serve") / "codes.npz"))
  engine = service_lib.SearchEngine(workdir, codes, max_batch=8)
  yield engine, service_lib.create_app(engine, max_upload_bytes=200_000), data
  engine.close()


def _png_bytes(array):
  import io  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top

  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="PNG")
  return buf.getvalue()


def test_service_api_answers_searches_and_errors(service):
  from starlette.testclient import TestClient  # pylint: disable=g-import-not-at-top

  engine, app, data = service
  client = TestClient(app, base_url="http://127.0.0.1")
  info = client.get("/api/info").json()
  assert info["num_codes"] == engine.num_codes == 60 and info["bits"] == 16
  entry = client.get("/api/archive?offset=13&limit=2").json()["entries"][0]
  assert (
    entry["id"] == 13 and entry["label"] == engine.archive.class_names[engine.archive.labels[13]]
  )
  # The same archive image by upload, by path and by id: identical answers, itself first.
  raw = open(entry["path"], "rb").read()
  by_upload = client.post("/api/search?k=7", files={"image": ("q.png", raw, "image/png")}).json()
  by_path = client.post("/api/search?k=7", json={"path": entry["path"]}).json()
  by_id = client.post("/api/search?k=7", json={"id": 13}).json()
  assert by_path["hits"] == by_id["hits"] and len(by_upload["hits"]) == 7
  # An archive query's labels mark its hits (retrieval.hits); an upload's are unknown.
  assert [dict(h, relevant=None) for h in by_id["hits"]] == by_upload["hits"]
  assert all(h["relevant"] == (h["label"] == entry["label"]) for h in by_id["hits"])
  assert by_path["query"]["id"] == 13 and by_upload["query"] == {"upload": "q.png"}
  dist = [h["distance"] for h in by_id["hits"]]
  assert (
    dist == sorted(dist)
    and dist[0] == 0
    and {"id", "path", "distance", "label", "rank"} <= set(by_id["hits"][0])
  )
  everything = client.post(f"/api/search?k={engine.num_codes}", json={"id": 13}).json()["hits"]
  assert {"id": 13, "distance": 0} in [
    {"id": h["id"], "distance": h["distance"]} for h in everything
  ]
  assert by_id["predicted"] in engine.encoder.class_names
  # An archive image as PNG, thumbnailed.
  r = client.get("/api/images/13?size=16")
  assert (
    r.status_code == 200
    and r.headers["content-type"] == "image/png"
    and r.content[:4] == b"\x89PNG"
  )
  # Bad requests: a JSON error with a 4xx status, and the service keeps serving.
  grey16 = _png_bytes(np.full((20, 20), 40000, np.uint16))
  bad = [
    ("k=0", "json", {"id": 1}, 400, "k=0 is out of range"),
    ("k=x", "json", {"id": 1}, 400, "k='x' is not an integer"),
    ("k=3", "json", {"id": 999}, 404, "no archive image with id 999"),
    ("k=3", "json", {"path": "/etc/passwd"}, 404, "not an image of the archive"),
    ("k=3", "json", {"nothing": 1}, 400, "JSON body must be"),
    ("k=3", "file", b"this is not an image", 415, "notes.txt: not an image"),
    (
      "k=3",
      "file",
      _png_bytes(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))[:300],
      415,
      "notes.txt: corrupt PNG image",
    ),
    ("k=3", "file", grey16, 422, "mode I;16"),
    ("k=3", "file", b"\x00" * 300_000, 413, "over the upload limit of 200000 bytes"),
  ]
  for query, kind, payload, status, message in bad:
    if kind == "json":
      r = client.post(f"/api/search?{query}", json=payload)
    else:
      r = client.post(f"/api/search?{query}", files={"image": ("notes.txt", payload, "text/plain")})
    assert r.status_code == status and message in r.json()["error"], (
      query,
      payload if kind == "json" else kind,
      r.status_code,
      r.text,
    )
  assert (
    client.get("/api/images/999").status_code == 404
    and "error" in client.get("/api/images/x").json()
  )
  assert client.get("/nowhere").status_code == 404 and "error" in client.get("/nowhere").json()
  assert client.post("/api/search?k=7", json={"id": 13}).json()["hits"] == by_id["hits"]


def test_service_batches_concurrent_queries_with_the_same_answers(service):
  """Queries arriving together are encoded and ranked in one batch: each answer equals the
  query's answer alone."""
  from starlette.testclient import TestClient  # pylint: disable=g-import-not-at-top

  engine, app, _ = service
  client = TestClient(app, base_url="http://127.0.0.1")
  alone = {
    i: client.post("/api/search?k=5", json={"id": i}).json()["hits"] for i in range(0, 60, 6)
  }
  batches = []
  real_run = engine._run  # pylint: disable=protected-access

  def counting_run(batch):
    batches.append(len(batch))
    return real_run(batch)

  engine._run = counting_run  # pylint: disable=protected-access
  try:
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
      together = dict(
        zip(
          alone,
          pool.map(lambda i: client.post("/api/search?k=5", json={"id": i}).json()["hits"], alone),
        )
      )
  finally:
    engine._run = real_run  # pylint: disable=protected-access
  assert together == alone
  assert sum(batches) == 10 and max(batches) > 1, batches


@pytest.fixture
def live_server(service, serve_in_thread):
  """The service on a free 127.0.0.1 port (uvicorn in a thread), stopped after the test."""
  return serve_in_thread(service[1])


def test_web_page_in_headless_chromium(live_server, service, chromium, tmp_path):
  """The page in a real browser (Debian's chromium driven by Playwright): pick an archive
  image, then upload a file; the hit grid shows distances in order; a bad upload shows the
  service's error. Writes a screenshot (RSHASH_SCREENSHOT_DIR, default the test's tmp dir)."""
  engine, _, _ = service
  entry = engine.archive.entry(25)
  bad = tmp_path / "notes.txt"
  bad.write_text("not an image")
  shots = os.environ.get("RSHASH_SCREENSHOT_DIR", str(tmp_path))
  os.makedirs(shots, exist_ok=True)
  with chromium() as browser:
    page = browser.new_page(viewport={"width": 1100, "height": 800})
    page.set_default_timeout(30_000)
    page.goto(live_server + "/")
    page.wait_for_selector("#archive img")
    assert f"{engine.num_codes} images" in page.inner_text("#info")
    # Pick an archive image: the hits appear, sorted by distance, the first at distance 0.
    page.fill("#k", "8")
    page.click("#archive img[data-id='3']")
    page.wait_for_selector("figure.hit")
    dist = [
      int(d)
      for d in page.eval_on_selector_all("figure.hit", "els => els.map(e => e.dataset.distance)")
    ]
    assert len(dist) == 8 and dist == sorted(dist) and dist[0] == 0
    # Upload a file: the grid is that query's answer.
    page.set_input_files("#file", entry["path"])
    page.click("#search")
    page.wait_for_function(
      "document.querySelector('#query').textContent.includes('upload') || "
      "document.querySelectorAll('figure.hit').length > 0"
    )
    page.wait_for_function(
      "document.querySelector('#query img') && "
      "document.querySelector('#query img').src.startsWith('blob:')"
    )
    ids = page.eval_on_selector_all("figure.hit", "els => els.map(e => Number(e.dataset.id))")
    want = engine.search_pixels(engine.read_archive_image(25), 8)["hits"]
    assert ids == [h["id"] for h in want]
    page.wait_for_function(
      "Array.from(document.querySelectorAll('figure.hit img')).every(i => i.complete && "
      "i.naturalWidth > 0)"
    )
    page.screenshot(path=os.path.join(shots, "serve_page.png"), full_page=True)
    # A bad upload: the page shows the service's message, and the next search works.
    page.set_input_files("#file", str(bad))
    page.click("#search")
    page.wait_for_function("document.querySelector('#error').textContent.length > 0")
    assert "notes.txt: not an image" in page.inner_text("#error")
    page.click("#archive img[data-id='3']")
    page.wait_for_selector("figure.hit")
    assert page.inner_text("#error") == ""
  assert os.path.getsize(os.path.join(shots, "serve_page.png")) > 10_000


def test_serve_command_and_saved_model_export_from_the_command_line(service, trained, tmp_path):
  """`serve` as users start it (a real process on 127.0.0.1), and `export --format=saved_model`."""
  import socket  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  import urllib.request  # pylint: disable=g-import-not-at-top

  engine, _, _ = service
  _, workdir, _ = trained
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  proc = subprocess.Popen(
    [
      sys.executable,
      "-m",
      "rshash_jax.main",
      "serve",
      f"--encoder={workdir}",
      f"--codes={engine.codes_path}",
      f"--port={port}",
    ],
    cwd=REPO,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  try:
    deadline = time.monotonic() + 120
    while True:
      assert proc.poll() is None and time.monotonic() < deadline, "serve did not come up"
      try:
        info = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/info", timeout=5))
        break
      except OSError:
        time.sleep(0.3)
    assert info["num_codes"] == engine.num_codes
    req = urllib.request.Request(
      f"http://127.0.0.1:{port}/api/search?k=4",
      data=json.dumps({"id": 7}).encode(),
      headers={"Content-Type": "application/json"},
    )
    hits = json.load(urllib.request.urlopen(req, timeout=30))["hits"]
    assert [h["id"] for h in hits] == [
      h["id"] for h in engine.search_pixels(engine.read_archive_image(7), 4)["hits"]
    ]
  finally:
    proc.terminate()
    out = proc.communicate(timeout=30)[0]
  assert f"on http://127.0.0.1:{port}/" in out
  # The export command: a SavedModel directory (its content is tested above); never overwrites.
  out_dir = tmp_path / "sm"
  r = subprocess.run(
    [
      sys.executable,
      "-m",
      "rshash_jax.main",
      "export",
      f"--workdir={workdir}",
      f"--out={out_dir}",
      "--format=saved_model",
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert r.returncode == 0 and (out_dir / "saved_model.pb").is_file(), r.stderr[-2000:]
  r = subprocess.run(
    [
      sys.executable,
      "-m",
      "rshash_jax.main",
      "export",
      f"--workdir={workdir}",
      f"--out={out_dir}",
      "--format=saved_model",
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert (
    r.returncode == 2
    and r.stderr.strip().splitlines()[-1]
    == f"rshash: error: export path exists, nothing written: {out_dir}"
  )


def test_service_with_a_multi_index_answers_as_with_the_scan(trained, service, tmp_path):
  from rshash_jax.serving import service as service_lib  # pylint: disable=g-import-not-at-top

  engine, _, _ = service
  index = commands.build_index(engine.codes_path, str(tmp_path / "idx"))
  for index_engine in ("auto", "multi_index"):
    indexed = service_lib.SearchEngine(
      trained[1], engine.codes_path, max_batch=2, index_path=index, index_engine=index_engine
    )
    try:
      for i in (0, 7, 25):
        image = engine.read_archive_image(i)
        assert indexed.search_pixels(image, 9)["hits"] == engine.search_pixels(image, 9)["hits"]
    finally:
      indexed.close()
  with pytest.raises(ValueError, match="index_engine='gpu' must be one of"):
    service_lib.SearchEngine(trained[1], engine.codes_path, index_path=index, index_engine="gpu")
