"""Scene archives (rshash_jax/data/scenes.py): windows, nodata, footprints, ground units,
windowed reads, and encode / search over whole scenes with footprints and places."""

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import rasterio
from PIL import Image
from pyproj import Transformer
from rasterio.transform import from_origin

from rshash_jax import errors
from rshash_jax.data import datasets, scenes
from rshash_jax.retrieval import codes as codes_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(path, data, crs="EPSG:32631", transform=None, nodata=None, **kw):
  c, h, w = data.shape
  profile = dict(driver="GTiff", width=w, height=h, count=c, dtype=data.dtype.name)
  if crs:
    profile.update(crs=crs, transform=transform or from_origin(500000, 5000000, 10, 10))
  if nodata is not None:
    profile["nodata"] = nodata
  profile.update(kw)
  with warnings.catch_warnings():  # a plain TIFF without coordinates is meant here
    warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
    with rasterio.open(path, "w", **profile) as d:
      d.write(data)
  return str(path)


def _scene_a(tmp_path, name="a.tif"):
  """600 x 500 px, 10 m, UTM 31N; the left 200 columns and a 40 x 40 hole are nodata (0)."""
  rng = np.random.default_rng(0)
  a = rng.integers(1, 255, (3, 500, 600), dtype=np.uint8)
  a[:, :, :200] = 0
  a[:, 300:340, 400:440] = 0
  return _write(tmp_path / name, a, nodata=0, tiled=True, blockxsize=128, blockysize=128), a


def test_grid_parse_names_the_flag():
  assert scenes.Grid.parse("256", "128") == scenes.Grid(256, 128, "px", 0.0)
  assert scenes.Grid.parse("2560m", "", "10") == scenes.Grid(2560, 2560, "m", 10.0)
  for tile, stride, gsd, flag in (
    ("0", "", "", "--tile"),
    ("25.5", "", "", "--tile"),
    ("abc", "", "", "--tile"),
    ("256", "-3", "", "--stride"),
    ("256", "128m", "", "--stride"),
    ("256", "", "0", "--gsd"),
    ("256", "", "nan", "--gsd"),
  ):
    with pytest.raises(errors.InvalidInput, match=flag):
      scenes.Grid.parse(tile, stride, gsd)


def test_windows_cover_the_scene_skip_nodata_and_carry_footprints(tmp_path):
  path, a = _scene_a(tmp_path)
  tiles, spec = scenes.scene_tiles([path], scenes.Grid.parse("64", "48"))
  cols = list(range(0, 600 - 64 + 1, 48)) + [600 - 64]  # the last flush with the edge
  rows = list(range(0, 500 - 64 + 1, 48)) + [500 - 64]
  valid = a[0] > 0
  expect = [(c, r) for r in rows for c in cols if valid[r : r + 64, c : c + 64].any()]
  assert sorted(map(tuple, tiles.window[:, :2].tolist())) == sorted(expect)
  assert tiles.skipped == len(rows) * len(cols) - len(expect) > 0
  assert (tiles.window[:, 2:] == 64).all() and (tiles.out == 64).all()
  assert spec.numbers == (1, 2, 3)
  # Footprints: the window's corners through the transform, then to WGS84 by pyproj.
  t = Transformer.from_crs("EPSG:32631", "EPSG:4326", always_xy=True)
  for i in (0, len(tiles) // 2, len(tiles) - 1):
    c, r, w, h = tiles.window[i]
    xs = 500000 + 10 * np.array([c, c + w, c + w, c])
    ys = 5000000 - 10 * np.array([r, r, r + h, r + h])
    np.testing.assert_allclose(tiles.corners[i], np.stack([xs, ys], 1))
    np.testing.assert_allclose(tiles.footprint[i], np.stack(t.transform(xs, ys), 1), atol=1e-9)
    np.testing.assert_allclose(
      tiles.centre[i], t.transform(500000 + 10 * (c + w / 2), 5000000 - 10 * (r + h / 2))
    )
  # Each tile path reads exactly its window.
  for p, (c, r, w, h) in zip(tiles.paths()[:5], tiles.window[:5]):
    np.testing.assert_array_equal(
      scenes.read_tile(p), a[:, r : r + h, c : c + w].transpose(1, 2, 0)
    )


def test_ground_units_over_two_crs_and_resolutions(tmp_path):
  rng = np.random.default_rng(1)
  a = _write(tmp_path / "utm31_10m.tif", rng.integers(0, 255, (3, 320, 320), dtype=np.uint8))
  b = _write(
    tmp_path / "utm33_20m.tif",
    rng.integers(0, 255, (3, 160, 160), dtype=np.uint8),
    crs="EPSG:32633",
    transform=from_origin(400000, 5100000, 20, 20),
  )
  tiles, _ = scenes.scene_tiles([a, b], scenes.Grid.parse("32", "32", "10"))  # 320 m windows
  in_a, in_b = tiles.scene == 0, tiles.scene == 1
  assert in_a.sum() == in_b.sum() == 100
  assert (tiles.window[in_a, 2:] == 32).all() and (tiles.window[in_b, 2:] == 16).all()
  assert (tiles.out == 32).all()  # the same output size and ground size everywhere
  sides = tiles.corners[:, 1, 0] - tiles.corners[:, 0, 0]
  np.testing.assert_allclose(sides, 320.0)
  img = scenes.read_tile(tiles.paths()[int(np.nonzero(in_b)[0][0])])
  assert img.shape == (32, 32, 3)
  # The same in metres, at each scene's own resolution: windows of 32 and 16 px.
  own, _ = scenes.scene_tiles([a, b], scenes.Grid.parse("320m"))
  assert (own.out[own.scene == 1] == 16).all() and (own.out[own.scene == 0] == 32).all()
  assert tiles.crs[0] != tiles.crs[1]


def _degrees(path, rng, top: float, res: float):
  """A 64 x 64 px scene in EPSG:4326 (lon/lat degrees) from (2E, top) with pixels of res."""
  data = rng.integers(0, 255, (3, 64, 64), dtype=np.uint8)
  return _write(path, data, crs="EPSG:4326", transform=from_origin(2.0, top, res, res))


def test_ground_units_in_a_geographic_crs(tmp_path):
  """A small scene in degrees is cut at its central latitude's ground scale (WGS84): at
  47.997N, 1e-4 degree pixels are about 7.46 m wide and 11.12 m tall."""
  geo = _degrees(tmp_path / "wgs84.tif", np.random.default_rng(4), 48.0, 1e-4)
  tiles, _ = scenes.scene_tiles([geo], scenes.Grid.parse("32", "", "10"))  # 320 m windows
  assert (tiles.window[:, 2:] == [43, 29]).all() and (tiles.out == 32).all()
  lat = np.radians(tiles.centre[:, 1])
  lon_m = 111412.84 * np.cos(lat) - 93.5 * np.cos(3 * lat) + 0.118 * np.cos(5 * lat)
  lat_m = 111132.92 - 559.82 * np.cos(2 * lat) + 1.175 * np.cos(4 * lat)
  width = (tiles.footprint[:, 1, 0] - tiles.footprint[:, 0, 0]) * lon_m
  height = np.abs(tiles.footprint[:, 2, 1] - tiles.footprint[:, 1, 1]) * lat_m
  np.testing.assert_allclose(width, 320, rtol=0.01)  # whole pixels: within 1% of 320 m
  np.testing.assert_allclose(height, 320, rtol=0.02)
  assert scenes.read_tile(tiles.paths()[0]).shape == (32, 32, 3)


def test_bad_scenes_and_windows_are_named(tmp_path):
  rng = np.random.default_rng(2)
  geo = _degrees(tmp_path / "wgs84.tif", rng, 48.0, 1e-4)
  wide = _degrees(tmp_path / "wide.tif", rng, 60.0, 0.05)  # 3.2 degrees of latitude at 58N
  with pytest.raises(errors.InvalidInput, match="wide.tif.*geographic.*latitudes 56.8"):
    scenes.scene_tiles([wide], scenes.Grid.parse("32", "", "10"))
  scenes.scene_tiles([geo, wide], scenes.Grid.parse("32"))  # pixels: fine in any CRS
  plain = _write(
    tmp_path / "plain.tif", rng.integers(0, 255, (3, 64, 64), dtype=np.uint8), crs=None
  )
  with pytest.raises(errors.InvalidInput, match="plain.tif.*no CRS"):
    scenes.scene_tiles([plain], scenes.Grid.parse("320m"))
  with pytest.raises(errors.InvalidInput, match="plain.tif.*smaller than one window"):
    scenes.scene_tiles([plain], scenes.Grid.parse("128"))
  empty = _write(tmp_path / "empty.tif", np.zeros((3, 64, 64), np.uint8), nodata=0)
  with pytest.raises(errors.InvalidInput, match="nodata only"):
    scenes.scene_tiles([empty], scenes.Grid.parse("32"))
  far = _write(
    tmp_path / "far.tif",
    rng.integers(0, 255, (3, 64, 64), dtype=np.uint8),
    transform=from_origin(1e30, 1e30, 10, 10),
  )
  with pytest.raises(errors.InvalidInput, match="far.tif: its CRS cannot be transformed"):
    scenes.scene_tiles([far], scenes.Grid.parse("32"))
  bad = tmp_path / "corrupt.tif"
  bad.write_bytes(b"II*\x00" + b"\x00" * 64)
  with pytest.raises(errors.NotAnImage, match="corrupt.tif"):
    scenes.scene_tiles([str(bad)], scenes.Grid.parse("32"))
  with pytest.raises(errors.InvalidInput, match="plain.tif: window 40,0 of 32 x 32 px goes past"):
    scenes.read_tile(scenes.tile_path(plain, (40, 0, 32, 32), (32, 32)))
  with pytest.raises(errors.NotFound, match="gone.tif"):
    scenes.read_tile(scenes.tile_path(str(tmp_path / "gone.tif"), (0, 0, 8, 8), (8, 8)))
  # A truncated scene: its header reads, a block does not; the error names scene and window.
  path, _ = _scene_a(tmp_path, "truncated.tif")
  data = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(data[: len(data) // 2])
  with pytest.raises(errors.NotAnImage, match="truncated.tif"):
    tiles, _ = scenes.scene_tiles([path], scenes.Grid.parse("64"))
    for p in tiles.paths():
      scenes.read_tile(p)


def test_no_scene_is_read_whole(tmp_path, monkeypatch):
  """A scene whose whole decode is over the image limit is cut and read window by window."""
  rng = np.random.default_rng(3)
  data = rng.integers(1, 10000, (3, 800, 800), dtype=np.uint16)
  path = _write(tmp_path / "big.tif", data, nodata=0, tiled=True, blockxsize=128, blockysize=128)
  monkeypatch.setenv("RSHASH_MAX_IMAGE_MB", "1")  # the scene, read whole: 7.3 MiB of float32
  spec = datasets.rasters.RasterSpec.parse("", "10000")
  with pytest.raises(errors.TooLarge, match="big.tif"):
    datasets.rasters.read(path, spec)
  table = datasets.scene_table(path, scenes.Grid.parse("128"), spec)
  assert len(table) == 49 and table.tiles.skipped == 0
  img = datasets.decode_other(table.paths[-1], table.raster)
  expect = np.clip(np.round(data[:, 672:, 672:] / 10000 * 255), 0, 255).astype(np.uint8)
  np.testing.assert_array_equal(img, expect.transpose(1, 2, 0))


def _mosaic(tmp_path, data_root, name, crs, origin, grid_w=4):
  """A scene of the generated 32 x 32 class images laid out on a grid; returns the scene
  path and {(col, row): class name} of each 32 px cell."""
  classes = sorted(d for d in os.listdir(data_root) if os.path.isdir(os.path.join(data_root, d)))
  imgs = []
  for c in classes:
    files = sorted(os.listdir(os.path.join(data_root, c)))[:grid_w]
    imgs += [
      (c, np.asarray(Image.open(os.path.join(data_root, c, f)).convert("RGB"))) for f in files
    ]
  rows = -(-len(imgs) // grid_w)
  a = np.zeros((rows * 32, grid_w * 32, 3), np.uint8)
  where = {}
  for i, (c, img) in enumerate(imgs):
    r, q = divmod(i, grid_w)
    a[r * 32 : r * 32 + 32, q * 32 : q * 32 + 32] = img
    where[(q * 32, r * 32)] = c
  path = _write(
    tmp_path / name, a.transpose(2, 0, 1), crs=crs, transform=from_origin(*origin, 10, 10)
  )
  return path, where


def run(args):
  """The command line in a child process with one CPU device."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return subprocess.run(
    [sys.executable, "-m", "rshash_jax.main", *args],
    capture_output=True,
    text=True,
    env=env,
    cwd=REPO,
    timeout=300,
  )


def test_encode_and_search_a_scene_archive(trained, tmp_path):
  root, workdir, data = trained
  scene_dir = tmp_path / "scenes"
  scene_dir.mkdir()
  a, where_a = _mosaic(scene_dir, data, "north.tif", "EPSG:32631", (500000, 5000000))
  b, _ = _mosaic(scene_dir, data, "east.tif", "EPSG:32633", (300000, 5100000))
  out = tmp_path / "codes.npz"
  r = run(
    [
      "encode",
      f"--encoder={workdir}",
      f"--data={scene_dir}",
      f"--out={out}",
      "--tile=32",
      "--stride=32",
      "--chunk=16",
    ]
  )
  assert r.returncode == 0, r.stderr
  db = codes_lib.load_codes(str(out))
  n_a = len(where_a)
  assert len(db["codes"]) == 2 * n_a  # every cell of both mosaics, nothing else
  assert list(db["scenes"]) == sorted([a, b])
  assert db["footprint"].shape == (2 * n_a, 4, 2) and np.isfinite(db["footprint"]).all()
  # The codes of the windows are the codes of the images placed there.
  from rshash_jax.retrieval import encoder as encoder_lib

  enc = encoder_lib.load_encoder(workdir)
  rows_a = np.nonzero(db["scenes"][db["scene"]] == a)[0]
  tiles = [datasets.decode_other(str(db["paths"][i])) for i in rows_a]
  np.testing.assert_array_equal(enc.encode(np.stack(tiles))["codes"], db["codes"][rows_a])

  # Search from a place: the window holding the point is the query; its own window is
  # among the hits at distance 0 (the tiny model has ties); the GeoJSON has footprint
  # polygons with scene and window.
  i = int(rows_a[5])
  lon, lat = db["footprint"][i].mean(axis=0)
  geo = tmp_path / "hits.geojson"
  bbox = db["footprint"][rows_a].reshape(-1, 2)
  box = [*(bbox.min(0) - 1e-6), *(bbox.max(0) + 1e-6)]
  r = run(
    [
      "search",
      f"--encoder={workdir}",
      f"--codes={out}",
      f"--k={n_a}",
      f"--point={lon},{lat}",
      f"--geojson={geo}",
      "--bbox=" + ",".join(map(str, box)),
    ]
  )
  assert r.returncode == 0, r.stderr
  assert f"spatial filter: {n_a} of {2 * n_a} archive entries ranked" in r.stdout
  fc = json.loads(geo.read_text())
  q = fc["features"][0]
  assert q["properties"]["role"] == "query" and q["properties"]["path"] == str(db["paths"][i])
  assert q["geometry"]["type"] == "Polygon" and len(q["geometry"]["coordinates"][0]) == 5
  hits = [f for f in fc["features"] if f["properties"]["role"] == "hit"]
  assert len(hits) == n_a and hits[0]["properties"]["distance"] == 0
  zero = [h["properties"]["path"] for h in hits if h["properties"]["distance"] == 0]
  assert str(db["paths"][i]) in zero
  assert all(h["properties"]["scene"] == a for h in hits)  # the box holds scene a only
  for h in hits:
    np.testing.assert_allclose(
      h["geometry"]["coordinates"][0][:4],
      db["footprint"][list(db["paths"]).index(h["properties"]["path"])],
    )
  # In process: the tile path and the id as queries, a --within polygon as the filter.
  from rshash_jax import commands

  poly = {
    "type": "Polygon",
    "coordinates": [db["footprint"][i].tolist() + [db["footprint"][i][0].tolist()]],
  }
  (tmp_path / "place.geojson").write_text(json.dumps({"type": "Feature", "geometry": poly}))
  res = commands.search(
    workdir,
    str(out),
    [str(db["paths"][i])],
    k=3,
    query_ids=[i],
    region=commands.parse_region(within=str(tmp_path / "place.geojson")),
  )
  near = {
    str(db["paths"][j])
    for j in range(len(db["paths"]))
    if db["scene"][j] == db["scene"][i]
    and abs(db["window"][j, 0] - db["window"][i, 0]) <= 32
    and abs(db["window"][j, 1] - db["window"][i, 1]) <= 32
  }
  for q in res:  # the polygon touches the window and its 8 neighbours' edges only
    assert q["query"] == str(db["paths"][i]) and q["footprint"] is not None
    assert {h["path"] for h in q["results"]} <= near and len(q["results"]) == 3
  with pytest.raises(errors.InvalidInput, match="--bbox=3,2,1,4 is invalid"):
    commands.parse_region(["3", "2", "1", "4"])
  # A point outside every window, a tile that is not in the archive: named errors.
  r = run(["search", f"--encoder={workdir}", f"--codes={out}", "--point=-120,10"])
  assert r.returncode == 2 and "--point=-120.0,10.0: no window" in r.stderr
  r = run(
    [
      "encode",
      f"--encoder={workdir}",
      f"--data={scene_dir}",
      "--stride=3",
      f"--out={tmp_path / 'x.npz'}",
    ]
  )
  assert r.returncode != 0 and "--stride and --gsd apply with --tile" in r.stderr


def test_codes_file_scene_fields_are_checked(tmp_path):
  z = {
    "scenes": np.asarray(["a.tif"]),
    "scene_crs": np.asarray([""]),
    "scene": np.zeros(2, np.int32),
    "window": np.asarray([[0, 0, 8, 8], [8, 0, 8, 8]], np.int64),
    "corners": np.zeros((2, 4, 2)),
    "footprint": np.zeros((2, 4, 2)),
  }

  def bad(field, what):
    raise errors.Corrupt(f"field {field!r} is {what}")

  codes_lib._check_scene_fields(z, 2, bad)  # pylint: disable=protected-access
  for field, value, match in (
    ("scene", np.asarray([0, 1], np.int32), "'scene' is with scene ids"),
    ("window", np.asarray([[0, 0, 0, 8], [8, 0, 8, 8]]), "'window' is with a negative"),
    ("footprint", np.zeros((2, 4)), "'footprint'"),
  ):
    broken = dict(z, **{field: value})
    with pytest.raises(errors.Corrupt, match=match):
      codes_lib._check_scene_fields(broken, 2, bad)  # pylint: disable=protected-access
  partial = {k: v for k, v in z.items() if k != "corners"}
  with pytest.raises(errors.Corrupt, match="'corners' is missing"):
    codes_lib._check_scene_fields(partial, 2, bad)  # pylint: disable=protected-access


@pytest.fixture(scope="module")
def scene_service(trained, tmp_path_factory):
  """(engine, app): the service over the tiny model's codes of two mosaics in two CRSs."""
  from rshash_jax import commands
  from rshash_jax.serving import service as service_lib

  _, workdir, data = trained
  root = tmp_path_factory.mktemp("scene_service")
  (root / "scenes").mkdir()
  _mosaic(root / "scenes", data, "north.tif", "EPSG:32631", (500000, 5000000))
  _mosaic(root / "scenes", data, "east.tif", "EPSG:32633", (300000, 5100000))
  codes = commands.encode(
    workdir, str(root / "scenes"), str(root / "codes.npz"), grid=scenes.Grid.parse("32")
  )
  engine = service_lib.SearchEngine(workdir, codes, max_batch=4)
  yield engine, service_lib.create_app(engine)
  engine.close()


def test_service_searches_by_place_and_region(scene_service):
  from starlette.testclient import TestClient

  engine, app = scene_service
  client = TestClient(app, base_url="http://127.0.0.1")
  info = client.get("/api/info").json()
  assert info["has_footprints"] and info["basemap"] == ""
  w, s, e, n = info["bounds"]
  fp = engine.archive.footprint
  assert (w, s, e, n) == (fp[..., 0].min(), fp[..., 1].min(), fp[..., 0].max(), fp[..., 1].max())
  i = 30
  lon, lat = fp[i].mean(axis=0)
  r = client.post("/api/search?k=4", json={"lon": lon, "lat": lat})
  assert r.status_code == 200, r.text
  body = r.json()
  assert body["query"]["id"] == i and body["query"]["footprint"] == fp[i].tolist()
  assert body["hits"][0]["distance"] == 0 and body["hits"][0]["window"] is not None
  # A box around scene 0's windows: only they are ranked, in the scan's order.
  rows = np.nonzero(engine.archive.scene == 0)[0]
  box = np.r_[fp[rows].reshape(-1, 2).min(0) + 1e-7, fp[rows].reshape(-1, 2).max(0) - 1e-7]
  r = client.post(f"/api/search?k=48&bbox={','.join(map(str, box))}", json={"id": int(rows[3])})
  assert r.status_code == 200, r.text
  got = [h["id"] for h in r.json()["hits"]]
  assert sorted(got) == list(rows) and all(
    h["scene"] == engine.archive.scenes[0] for h in r.json()["hits"]
  )
  for body, status, match in (
    ({"lon": -120.0, "lat": 10.0}, 404, "no window of the archive holds"),
    ({"lon": "x", "lat": 10.0}, 400, "lon must be a number"),
    ({"lon": 200.0, "lat": 10.0}, 400, "outside"),
  ):
    r = client.post("/api/search", json=body)
    assert r.status_code == status and match in r.json()["error"]
  r = client.post("/api/search?bbox=1,2,0,3", json={"id": 0})
  assert r.status_code == 400 and "bbox" in r.json()["error"]
  r = client.post("/api/search?bbox=-120,10,-119,11", json={"id": 0})
  assert r.status_code == 404 and "no archive entry lies in bbox" in r.json()["error"]
  assert client.get("/static/vendor/leaflet/leaflet.js").status_code == 200
  assert client.get("/static/../service.py").status_code == 404


def test_map_page_in_headless_chromium(scene_service, serve_in_thread, chromium, tmp_path):
  """The page's map in a real browser: with no basemap a graticule; click the map to search
  from that place (the window there is the query); the hits' footprints are drawn; click
  one to see its chip. Writes serve_map.png (RSHASH_SCREENSHOT_DIR, default tmp)."""
  engine, app = scene_service
  url = serve_in_thread(app)
  shots = os.environ.get("RSHASH_SCREENSHOT_DIR", str(tmp_path))
  os.makedirs(shots, exist_ok=True)
  i = 45
  lon, lat = engine.archive.footprint[i].mean(axis=0)
  with chromium() as browser:
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.set_default_timeout(30_000)
    page.goto(url + "/")
    page.wait_for_selector("#archive img")
    assert f"{engine.num_codes} windows" in page.inner_text("#info")
    assert page.is_visible("#map")
    assert page.eval_on_selector_all(".leaflet-overlay-pane path", "els => els.length") > 2
    assert page.eval_on_selector_all(".grid-label", "els => els.length") > 2
    assert page.eval_on_selector_all("path.scene-outline", "els => els.length") == 2
    page.fill("#k", "6")
    page.evaluate(f"rshashMap.setView([{float(lat)}, {float(lon)}], 15, {{animate: false}})")
    x, y = page.evaluate(
      "([lat, lon]) => { const p = rshashMap.latLngToContainerPoint([lat, lon]); "
      "return [p.x, p.y]; }",
      [float(lat), float(lon)],
    )
    box = page.locator("#map").bounding_box()
    page.mouse.click(box["x"] + x, box["y"] + y)
    page.wait_for_selector("path.footprint.hit", state="attached")
    assert page.get_attribute("#query img", "src") == f"/api/images/{i}?size=256"
    hit_ids = page.eval_on_selector_all("path.footprint.hit", "els => els.map(e => e.dataset.id)")
    want = engine.search_pixels(engine.read_archive_image(i), 6)["hits"]
    assert sorted(map(int, hit_ids)) == sorted(h["id"] for h in want)
    assert page.eval_on_selector_all("path.footprint.query", "els => els.length") == 1
    # Click the best hit's footprint: its chip appears (and no new search starts).
    best = want[0]["id"]
    page.dispatch_event(f"path.footprint.hit[data-id='{best}']", "click")
    page.wait_for_selector("#chip img")
    assert page.get_attribute("#chip img", "src") == f"/api/images/{best}?size=256"
    page.wait_for_function("document.querySelector('#chip img').naturalWidth > 0")
    assert page.get_attribute("#query img", "src") == f"/api/images/{i}?size=256"
    page.screenshot(path=os.path.join(shots, "serve_map.png"), full_page=True)
    assert page.inner_text("#error") == ""
  assert os.path.getsize(os.path.join(shots, "serve_map.png")) > 10_000


def _cell_polygon(path, col, row, size=32, shrink=4):
  """A polygon (scene CRS) inside the cell at (col, row) of a mosaic, and its WGS84 form."""
  with rasterio.open(path) as src:
    t, crs = src.transform, src.crs.to_string()
  x0, y0 = t @ (col + shrink, row + shrink)
  x1, y1 = t @ (col + size - shrink, row + size - shrink)
  ring = [(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)]
  tr = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
  return ring, [list(tr.transform(x, y)) for x, y in ring], crs


def test_scene_labels_from_geojson_and_geopackage(trained, tmp_path):
  import pyogrio.raw
  import shapely

  _, _, data = trained
  (tmp_path / "s").mkdir()
  a, where_a = _mosaic(tmp_path / "s", data, "north.tif", "EPSG:32631", (500000, 5000000))
  grid = scenes.Grid.parse("32")
  feats, rings, classes = [], [], []
  for (c, r), cls in where_a.items():  # a polygon inside every cell, the class placed there
    ring, ring84, crs = _cell_polygon(a, c, r)
    rings.append(shapely.Polygon(ring))
    classes.append(cls)
    feats.append(
      {
        "type": "Feature",
        "properties": {"class": cls},
        "geometry": {"type": "Polygon", "coordinates": [ring84]},
      }
    )
  # Two points of different classes in the first cell: that window is left out.
  (c, r), _ = next(iter(where_a.items()))
  _, ring84, _ = _cell_polygon(a, c, r)
  for cls in ("x_one", "x_two"):
    feats.append(
      {
        "type": "Feature",
        "properties": {"class": cls},
        "geometry": {"type": "Point", "coordinates": ring84[0]},
      }
    )
  gj = tmp_path / "labels.geojson"
  gj.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
  table = datasets.scene_table(str(tmp_path / "s"), grid, labels=str(gj))
  assert len(table) == len(where_a) - 1 and "conflicting labels (1)" in table.description
  assert "x_one" not in table.class_names
  for p, lab in zip(table.paths, table.labels):
    _, (c, r, _, _), _ = scenes.parse_tile(p)
    assert table.class_names[lab] == where_a[(c, r)]
  # The same polygons in a GeoPackage in the scene's own CRS: the same table.
  gpkg = tmp_path / "labels.gpkg"
  pyogrio.raw.write(
    str(gpkg),
    shapely.to_wkb(np.asarray(rings)),
    [np.asarray(classes, dtype=object)],
    fields=["class"],
    crs=crs,
    driver="GPKG",
    geometry_type="Polygon",
  )
  table2 = datasets.scene_table(str(tmp_path / "s"), grid, labels=str(gpkg))
  assert len(table2) == len(where_a)
  for p, lab in zip(table2.paths, table2.labels):
    _, (c, r, _, _), _ = scenes.parse_tile(p)
    assert table2.class_names[lab] == where_a[(c, r)]
  # Errors name the file, the field and the feature.
  with pytest.raises(errors.InvalidInput, match="no field 'kind'.*class"):
    datasets.scene_table(str(tmp_path / "s"), grid, labels=str(gj), label_field="kind")
  far = dict(feats[0], geometry={"type": "Point", "coordinates": [-120.0, 10.0]})
  gj.write_text(json.dumps({"type": "FeatureCollection", "features": feats + [far]}))
  with pytest.raises(errors.InvalidInput, match=f"feature {len(feats)} .* outside every window"):
    datasets.scene_table(str(tmp_path / "s"), grid, labels=str(gj))


def test_dhcnn_trains_on_labelled_scene_windows(trained, tmp_path):
  """data.source=scenes:DIR with polygon labels: the windows of a mosaic of the class-folder
  images, labelled by polygons, are the same table as the folder (same pixels, labels and
  order): the tiny DHCNN trained on either gives the same mAP."""
  sys.path.insert(0, os.path.join(REPO, "configs"))
  import dhcnn as dhcnn_config
  from rshash_jax.training import train_dhcnn

  _, _, data = trained
  (tmp_path / "s").mkdir()
  a, where_a = _mosaic(
    tmp_path / "s", data, "north.tif", "EPSG:32631", (500000, 5000000), grid_w=10
  )
  feats = []
  for (c, r), cls in where_a.items():
    _, ring84, _ = _cell_polygon(a, c, r)
    feats.append(
      {
        "type": "Feature",
        "properties": {"class": cls},
        "geometry": {"type": "Polygon", "coordinates": [ring84]},
      }
    )
  (tmp_path / "labels.geojson").write_text(
    json.dumps({"type": "FeatureCollection", "features": feats})
  )
  c = dhcnn_config.get_config("tiny")
  c.data.source = f"scenes:{tmp_path / 's'}"
  c.data.tile = "32"
  c.data.scene_labels = str(tmp_path / "labels.geojson")
  res = train_dhcnn.train_and_evaluate(c, str(tmp_path / "w"))
  assert "labelled windows of 1 scene(s)" in res["dataset_description"]
  c.data.source = f"folder:{data}"
  folder = train_dhcnn.train_and_evaluate(c, str(tmp_path / "w_folder"))
  assert res["num_classes"] == folder["num_classes"] == 6
  assert res["map"] == folder["map"] and res["accuracy"] == folder["accuracy"]
