"""The search service and the image decoders under hostile input (issue 30): decompression
bombs, a memory budget for decodes, slow and greedy clients, Host and Origin, malformed
JSON, statuses by the error's type, many-band rasters, and no compilation at request time."""

import io
import logging
import socket
import struct
import threading
import time
import zlib

import numpy as np
import pytest

from rshash_jax import commands, errors
from rshash_jax.data import datasets, image_limits, input_pipeline


def png_bomb(w: int, h: int) -> bytes:
  """A valid RGB PNG of w x h zeros, built without holding its pixels (8000^2: 187 KB)."""
  co = zlib.compressobj(9)
  row = b"\0" * (w * 3 + 1)
  data = b"".join(co.compress(row) for _ in range(h)) + co.flush()

  def chunk(kind, payload):
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

  ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
  return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def pil_bytes(size, fmt, mode="RGB", **kw) -> bytes:
  from PIL import Image  # pylint: disable=g-import-not-at-top

  buf = io.BytesIO()
  Image.new(mode, size).save(buf, fmt, **kw)
  return buf.getvalue()


def sparse_tiff(path, w, h, count=3, dtype="uint8") -> bytes:
  """A tiled GeoTIFF whose blocks are absent (GDAL's SPARSE_OK): a few KB on disk, w x h x
  count when read."""
  import rasterio  # pylint: disable=g-import-not-at-top
  import warnings  # pylint: disable=g-import-not-at-top

  with warnings.catch_warnings():
    warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
    with rasterio.open(
      path,
      "w",
      driver="GTiff",
      width=w,
      height=h,
      count=count,
      dtype=dtype,
      tiled=True,
      SPARSE_OK=True,
    ):
      pass
  return open(path, "rb").read()


def small_tiff(path, count, dtype="uint8") -> bytes:
  import rasterio  # pylint: disable=g-import-not-at-top
  import warnings  # pylint: disable=g-import-not-at-top

  data = (np.arange(count * 32 * 32) % 200).reshape(count, 32, 32).astype(dtype)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
    with rasterio.open(
      path, "w", driver="GTiff", width=32, height=32, count=count, dtype=dtype
    ) as dst:
      dst.write(data)
  return open(path, "rb").read()


@pytest.fixture(scope="module")
def engine(trained, tmp_path_factory):
  from rshash_jax.serving import service  # pylint: disable=g-import-not-at-top

  _, workdir, data = trained
  codes = commands.encode(workdir, data, str(tmp_path_factory.mktemp("hard") / "codes.npz"))
  eng = service.SearchEngine(
    workdir, codes, max_batch=2, max_k=40, max_image_bytes=8 << 20, image_budget_bytes=64 << 20
  )
  yield eng
  eng.close()


@pytest.fixture
def client(engine):
  from starlette.testclient import TestClient  # pylint: disable=g-import-not-at-top
  from rshash_jax.serving import service  # pylint: disable=g-import-not-at-top

  app = service.create_app(engine, max_upload_bytes=2 << 20)
  return TestClient(app, base_url="http://127.0.0.1")


def upload(client, data, name="q.png", k=3, **kw):
  return client.post(f"/api/search?k={k}", files={"image": (name, data, "image/png")}, **kw)


def test_bombs_are_refused_from_the_header_before_decoding(client, tmp_path, monkeypatch):
  bombs = {
    "png.png": png_bomb(8000, 8000),  # 187 KB -> 183 MB
    "jpeg.jpg": pil_bytes((3000, 3000), "JPEG"),  # 26 MB
    "gif.gif": pil_bytes((4000, 4000), "GIF", mode="L"),  # 16 MB (one band)
    "webp.webp": pil_bytes((3000, 3000), "WEBP", lossless=True),  # 26 MB
    "tiff.tif": sparse_tiff(tmp_path / "s.tif", 12000, 12000),  # 18 KB -> 1.6 GB as float32
  }
  for name, data in bombs.items():
    assert len(data) < 400_000, (name, len(data))
    t0 = time.perf_counter()
    r = upload(client, data, name)
    assert r.status_code == 413 and "over the limit of 8 MB" in r.json()["error"], (name, r.text)
    assert name in r.json()["error"] and time.perf_counter() - t0 < 2.0, name
  # Under the limit, the same formats decode and search.
  ok = upload(client, pil_bytes((1000, 1000), "WEBP"), "fine.webp")
  assert ok.status_code == 200 and len(ok.json()["hits"]) == 3
  # Files on the command line have their own limit (RSHASH_MAX_IMAGE_MB), checked as the
  # dataset's headers are read, so a bomb in an archive stops `encode` before any work.
  path = tmp_path / "bomb.png"
  path.write_bytes(bombs["png.png"])
  monkeypatch.setenv(image_limits.ENV, "100")
  with pytest.raises(errors.TooLarge, match=r"bomb.png: 8000 x 8000 pixels .* over the limit"):
    datasets.check_image(str(path))
  with pytest.raises(errors.TooLarge, match="bomb.png"):
    input_pipeline.decode_file(str(path))
  monkeypatch.setenv(image_limits.ENV, "x")
  with pytest.raises(errors.InvalidInput, match="RSHASH_MAX_IMAGE_MB='x'"):
    image_limits.max_decoded_bytes()


def test_concurrent_decodes_stay_within_the_memory_budget():
  w = image_limits.WORKING_SET
  budget = image_limits.Budget(100 * w, timeout_s=5)
  peak, lock = [0], threading.Lock()

  def decode(n):
    with image_limits.held(budget):
      image_limits.check("x", n, 1, 1, 1, limit=1000)
      with lock:
        peak[0] = max(peak[0], budget.in_use)
      time.sleep(0.02)

  threads = [threading.Thread(target=decode, args=(n,)) for n in (60, 50, 40, 30, 70, 20) * 3]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert peak[0] <= 100 * w and budget.in_use == 0
  # One larger than the whole budget runs alone; a wait past the timeout is a 503.
  budget = image_limits.Budget(100, timeout_s=0.2)
  budget.acquire(80, "a")
  with pytest.raises(errors.Timeout, match="b: waited 0.2 s"):
    budget.acquire(30, "b")
  budget.release(80)
  with image_limits.held(budget):
    image_limits.check("big", 500, 1, 1, 1, limit=1000)
    assert budget.in_use == 500 * w
  assert budget.in_use == 0


def test_statuses_follow_the_error_type_not_its_text(client, tmp_path):
  f32 = small_tiff(tmp_path / "f.tif", 3, "float32")
  for name in ("f32.tif", "band.tif", "bands of pixels.png"):
    r = upload(client, f32, name)
    assert r.status_code == 422 and "needs data.scale" in r.json()["error"], (name, r.text)
  for name in ("band.png", "x.png"):
    r = upload(client, b"band band band", name)
    assert r.status_code == 415, (name, r.text)
  # Many-band rasters sent to an RGB encoder are refused, not read as bands 1-3.
  for count in (13, 200):
    r = upload(client, small_tiff(tmp_path / f"m{count}.tif", count), "s2.tif")
    assert r.status_code == 422 and f"has {count} bands" in r.json()["error"], r.text
    assert "data.bands=4,3,2" in r.json()["error"]
  assert upload(client, small_tiff(tmp_path / "rgb.tif", 3), "rgb.tif").status_code == 200


def test_malformed_json_and_absurd_parameters_are_400(client):
  for body in ({"path": ["a"]}, {"path": {"x": 1}}, {"id": "3"}, {"id": 1.5}, [1, 2], "x"):
    r = client.post("/api/search?k=3", json=body)
    assert r.status_code in (400, 404) and "error" in r.json(), (body, r.text)
  deep = "[" * 100_000 + "]" * 100_000
  r = client.post(
    "/api/search?k=3", content=deep.encode(), headers={"content-type": "application/json"}
  )
  assert r.status_code == 400 and "not JSON" in r.json()["error"]
  for k in ("41", "100000000", "-1", "1e9"):
    assert client.post(f"/api/search?k={k}", json={"id": 1}).status_code == 400, k


def test_no_compilation_at_request_time(engine, client):
  before = len(engine.index._fns)  # pylint: disable=protected-access
  assert sorted(k for k, _ in engine.index._fns) == engine.k_buckets == [40]  # pylint: disable=protected-access
  for k in (1, 7, 33, 40):
    hits = client.post(f"/api/search?k={k}", json={"id": 2}).json()["hits"]
    assert len(hits) == k
  assert len(engine.index._fns) == before  # pylint: disable=protected-access


def test_host_and_origin_are_checked(engine):
  from starlette.testclient import TestClient  # pylint: disable=g-import-not-at-top
  from rshash_jax.serving import service  # pylint: disable=g-import-not-at-top

  app = service.create_app(engine)
  assert TestClient(app, base_url="http://attacker.example").get("/api/info").status_code == 400
  local = TestClient(app, base_url="http://127.0.0.1:8080")
  assert local.get("/api/info").status_code == 200
  post = lambda origin: (
    local.post("/api/search?k=2", json={"id": 1}, headers={"origin": origin}).status_code
  )
  assert post("http://127.0.0.1:8080") == 200  # the service's own page
  assert post("https://attacker.example") == 403
  assert post("http://127.0.0.1:9999") == 403  # another local site
  assert post("null") == 403
  opened = service.create_app(
    engine, allowed_hosts=["search.lab"], allowed_origins=["https://lab.example"]
  )
  lab = TestClient(opened, base_url="http://search.lab")
  assert lab.get("/api/info").status_code == 200
  r = lab.post("/api/search?k=2", json={"id": 1}, headers={"origin": "https://lab.example"})
  assert r.status_code == 200


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture
def guarded_server(engine):
  import uvicorn  # pylint: disable=g-import-not-at-top
  from rshash_jax.serving import service  # pylint: disable=g-import-not-at-top

  port = _free_port()
  config = uvicorn.Config(
    service.create_app(engine, max_upload_bytes=2 << 20),
    host="127.0.0.1",
    port=port,
    log_level="warning",
    limit_concurrency=64,
    timeout_keep_alive=1,
    http=service.guarded_protocol(request_timeout_s=1.0, max_per_client=8),
  )
  server = uvicorn.Server(config)
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  deadline = time.monotonic() + 30
  while not server.started:
    assert time.monotonic() < deadline and thread.is_alive()
    time.sleep(0.05)
  yield port
  server.should_exit = True
  thread.join(timeout=10)


def _closed_by_server(sock, wait):
  sock.settimeout(wait)
  try:
    return sock.recv(1024) == b""
  except socket.timeout:
    return False
  except ConnectionResetError:
    return True


def test_slow_and_greedy_clients_leave_room_for_others(guarded_server, caplog):
  import urllib.request  # pylint: disable=g-import-not-at-top

  port = guarded_server
  slow = []
  for i in range(20):  # from another loopback address: another client
    s = socket.socket()
    s.bind(("127.0.0.2", 0))
    s.connect(("127.0.0.1", port))
    s.sendall([b"GET /api/in", b"POST /api/search HTTP/1.1\r\nHost: 127.0.0.1\r\n"][i % 2])
    slow.append(s)
  time.sleep(0.2)
  # Over 8 connections per client: the extra ones are closed at once.
  refused = sum(_closed_by_server(s, 0.3) for s in slow[8:])
  assert refused == 12
  # Another client is served while the slow ones hang.
  t0 = time.perf_counter()
  info = urllib.request.urlopen(f"http://127.0.0.1:{port}/api/info", timeout=5)
  assert info.status == 200 and time.perf_counter() - t0 < 1.0
  # Incomplete requests are closed after the request timeout (1 s here), headers or body.
  assert all(_closed_by_server(s, 3.0) for s in slow[:8])
  body = socket.create_connection(("127.0.0.1", port))
  body.sendall(
    b"POST /api/search?k=2 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    b'Content-Length: 1000\r\n\r\n{"id"'
  )
  assert _closed_by_server(body, 3.0)
  # A client that disconnects mid-upload is not an error in the log.
  with caplog.at_level(logging.DEBUG, logger="rshash_jax.serving"):
    gone = socket.create_connection(("127.0.0.1", port))
    gone.sendall(
      b"POST /api/search?k=2 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data;"
      b" boundary=XX\r\nContent-Length: 100000\r\n\r\n--XX\r\nContent-Disposition: form-data;"
      b' name="image"; filename="a.png"\r\n\r\n' + b"\0" * 1000
    )
    time.sleep(0.3)
    gone.close()
    time.sleep(0.5)
  assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
  for s in slow + [body]:
    s.close()
  assert urllib.request.urlopen(f"http://127.0.0.1:{port}/api/info", timeout=5).status == 200
