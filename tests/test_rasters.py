"""GeoTIFF rasters: band choice, scaling, nodata, coordinates, errors, and a run end to end.

The tests write their own Sentinel-2-like tiles with rasterio: 13 uint16 reflectance bands
named B1..B12 + B8A, a UTM zone 32N transform, some nodata."""

import json
import os
import sys

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")
from rasterio.transform import from_origin  # noqa: E402
from rasterio.warp import transform as warp_transform  # noqa: E402

from rshash_jax import commands, errors  # noqa: E402
from rshash_jax.data import datasets, input_pipeline, rasters  # noqa: E402
from rshash_jax.training import train_dhcnn  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
import dhcnn as dhcnn_config  # noqa: E402

S2 = ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12"]


def write_tile(
  path,
  data,
  *,
  descriptions=S2,
  crs="EPSG:32632",
  origin=(500000.0, 5200000.0),
  res=10.0,
  nodata=0,
  georef=True,
):
  """data: [C, H, W] array written as a GeoTIFF."""
  c, h, w = data.shape
  profile = dict(driver="GTiff", width=w, height=h, count=c, dtype=data.dtype, nodata=nodata)
  if georef:
    profile.update(crs=crs, transform=from_origin(origin[0], origin[1], res, res))
  with rasterio.open(path, "w", **profile) as dst:
    dst.write(data)
    for i, d in enumerate(descriptions[:c], 1):
      dst.set_band_description(i, d)


def s2_tile(rng, cls, size=32):
  """Reflectance 0..10000 with a class-dependent pattern in B4/B3/B2 (1-based 4, 3, 2)."""
  data = rng.integers(200, 3000, (13, size, size)).astype(np.uint16)
  yy, xx = np.mgrid[:size, :size]
  pattern = ((np.sin((xx if cls % 2 else yy) * (0.3 + 0.25 * cls)) + 1) * 3500).astype(np.uint16)
  data[3 - cls % 3] += pattern
  return data


def test_bands_by_number_and_description_scaling_and_nodata(tmp_path):
  rng = np.random.default_rng(0)
  data = s2_tile(rng, 1)
  data[:, :2, :] = 0  # nodata rows
  path = str(tmp_path / "t.tif")
  write_tile(path, data)
  by_number = rasters.read(path, rasters.RasterSpec.parse("4,3,2", "10000"))
  by_name = rasters.read(path, rasters.RasterSpec.parse("B4,B3,B2", "10000"))
  np.testing.assert_array_equal(by_number, by_name)
  want = np.clip(np.round(data[[3, 2, 1]].astype(np.float32) / 10000 * 255), 0, 255).astype(
    np.uint8
  )
  np.testing.assert_array_equal(by_number, want.transpose(1, 2, 0))
  assert (by_number[:2] == 0).all()
  # Through the pipeline's decoder, with the spec on the table.
  img = input_pipeline.load_image(path, 16, raster=rasters.RasterSpec.parse("B4,B3,B2", "10000"))
  assert img.shape == (16, 16, 3) and img.dtype == np.uint8
  # A percentile stretch leaves nodata out: fitted values come from the valid pixels only.
  spec = rasters.fit_stretch([path], rasters.RasterSpec.parse("4", "stretch:0,100"))
  valid = data[3, 2:]
  assert spec.low == (float(valid.min()),) and spec.high == (float(valid.max()),)
  grey = rasters.read(path, spec)
  assert (
    grey.shape == (32, 32, 3) and (grey[..., 0] == grey[..., 2]).all() and grey[2:].max() == 255
  )


@pytest.mark.filterwarnings(
  "ignore::rasterio.errors.NotGeoreferencedWarning"
)  # writing the plain tile
def test_center_coordinates_match_rasterio(tmp_path):
  path = str(tmp_path / "t.tif")
  write_tile(path, s2_tile(np.random.default_rng(1), 0), origin=(612340.0, 5123450.0), res=20.0)
  lon, lat = rasters.center_lonlat(path)
  with rasterio.open(path) as src:
    x, y = src.xy(src.height / 2, src.width / 2, offset="ul")
    (want_lon,), (want_lat,) = warp_transform(src.crs, "EPSG:4326", [x], [y])
  assert abs(lon - want_lon) < 1e-9 and abs(lat - want_lat) < 1e-9
  assert 9.0 < lon < 11.0 and 45.0 < lat < 47.0  # UTM 32N, northern Italy
  plain = str(tmp_path / "plain.tif")
  write_tile(plain, s2_tile(np.random.default_rng(1), 0), georef=False)
  assert np.isnan(rasters.center_lonlat(plain)).all()  # nothing is invented


def test_bad_rasters_are_named_before_any_work(tmp_path):
  path = str(tmp_path / "t.tif")
  write_tile(path, s2_tile(np.random.default_rng(2), 0))
  with pytest.raises(
    errors.InvalidInput, match=r"t.tif: data.bands asks for band 14 but the raster has 13"
  ):
    rasters.check(path, rasters.RasterSpec.parse("14,3,2", "10000"))
  with pytest.raises(errors.InvalidInput, match=r"t.tif: data.bands asks for band 'B99'"):
    rasters.check(path, rasters.RasterSpec.parse("B4,B99,B2", "10000"))
  with pytest.raises(errors.InvalidInput, match=r"t.tif: a uint16 raster needs data.scale"):
    rasters.check(path, rasters.RasterSpec.parse("4,3,2", ""))
  empty = str(tmp_path / "empty.tif")
  write_tile(empty, np.zeros((13, 8, 8), np.uint16))
  with pytest.raises(
    errors.InvalidInput, match=r"empty.tif: every pixel of bands \(4, 3, 2\) is nodata"
  ):
    rasters.read(empty, rasters.RasterSpec.parse("4,3,2", "10000"))
  broken = tmp_path / "broken.tif"
  broken.write_bytes(b"II*\x00 not really a tiff")
  with pytest.raises(errors.InvalidInput, match=r"corrupt or unreadable raster: .*broken.tif"):
    datasets.check_image(str(broken))
  for bands, scale, message in [
    ("4,3", "", "selects 2 bands"),
    ("4,B3,2", "", "not both"),
    ("0,1,2", "", "count from 1"),
    ("", "-3", "positive divisor"),
    ("", "stretch:50,10", "LO < HI"),
  ]:
    with pytest.raises(errors.InvalidInput, match=message):
      rasters.RasterSpec.parse(bands, scale)


@pytest.fixture(scope="module")
def s2_archive(tmp_path_factory):
  root = tmp_path_factory.mktemp("s2")
  rng = np.random.default_rng(3)
  for c in range(3):
    os.makedirs(root / f"class{c}")
    for i in range(8):
      write_tile(
        str(root / f"class{c}" / f"tile{i}.tif"),
        s2_tile(rng, c),
        origin=(500000.0 + 2000 * c, 5200000.0 - 1000 * i),
      )
  return root


def test_sentinel2_archive_end_to_end(s2_archive, tmp_path, monkeypatch):
  """Train on B4,B3,B2 with a stretch fitted on the training split, encode (coordinates in
  the codes file; each raster opened twice: header, then pixels; padding is not decoded),
  search with --geojson; a raster with other bands is refused."""
  c = dhcnn_config.get_config("tiny")
  c.data.source = f"folder:{s2_archive}"
  c.data.bands, c.data.scale = "B4,B3,B2", "stretch"
  res = train_dhcnn.train_and_evaluate(c, str(tmp_path / "w"))
  # Every tile read and ranked. (The tiny model does not separate these 24 tiles: one code
  # for all, as it gives for the same pixels as PNGs; quality is asserted on real data in
  # tests/test_real_regression.py, so no bound on mAP here.)
  assert res["num_database"] + res["num_query"] == 24 and res["num_query"] == 6, res
  meta = json.load(open(tmp_path / "w" / "encoder" / "encoder.json"))
  assert meta["raster"]["bands"] == ["B4", "B3", "B2"] and len(meta["raster"]["low"]) == 3
  opened = []
  open_raster = rasters.open_raster
  monkeypatch.setattr(rasters, "open_raster", lambda p: opened.append(p) or open_raster(p))
  codes = commands.encode(str(tmp_path / "w"), str(s2_archive), str(tmp_path / "codes.npz"))
  monkeypatch.undo()
  assert len(opened) == 2 * 24 and len(set(opened)) == 24
  z = np.load(codes)
  for j, p in enumerate(z["paths"]):
    np.testing.assert_allclose(
      (z["lon"][j], z["lat"][j]), rasters.center_lonlat(str(p)), atol=1e-12
    )
  query = str(s2_archive / "class1" / "tile0.tif")
  out = commands.search(
    str(tmp_path / "w"), codes, [query], k=5, geojson=str(tmp_path / "hits.geojson")
  )
  fc = json.load(open(tmp_path / "hits.geojson"))
  assert fc["type"] == "FeatureCollection" and len(fc["features"]) == 6
  q, hits = fc["features"][0], fc["features"][1:]
  assert q["properties"]["role"] == "query" and q["geometry"]["coordinates"] == list(
    rasters.center_lonlat(query)
  )
  for h, r in zip(hits, out[0]["results"]):
    assert h["properties"]["distance"] == r["distance"] and h["properties"]["path"] == r["path"]
    assert h["geometry"]["coordinates"] == list(rasters.center_lonlat(r["path"]))
  # A raster without the encoder's bands: refused, named, before encoding anything.
  other = tmp_path / "other" / "a"
  other.mkdir(parents=True)
  write_tile(
    str(other / "x.tif"),
    s2_tile(np.random.default_rng(4), 0)[:4],
    descriptions=["B2", "B3", "B8", "B11"],
  )
  with pytest.raises(errors.InvalidInput, match=r"x.tif: data.bands asks for band 'B4'"):
    commands.encode(str(tmp_path / "w"), str(tmp_path / "other"), str(tmp_path / "other.npz"))
  assert not (tmp_path / "other.npz").exists()


def test_multispectral_tfds_source_through_the_same_switches(tmp_path):
  """A TFDS builder with a float32 [H, W, 13] Tensor feature (as eurosat/all's `sentinel2`)
  and multi-labels (a Sequence of ClassLabel, as bigearthnet's `labels`): multi-hot rows;
  refused without data.scale, then streamed through data.bands / data.scale, the stretch
  fitted on training examples."""
  tfds = pytest.importorskip("tensorflow_datasets")
  from rshash_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top

  class TinyMultispectral(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(
          {
            "sentinel2": tfds.features.Tensor(shape=(16, 16, 13), dtype=np.float32),
            "labels": tfds.features.Sequence(tfds.features.ClassLabel(names=["a", "b", "c"])),
          }
        ),
      )

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      rng = np.random.default_rng(0)
      for i in range(10):
        yield (
          i,
          {
            "sentinel2": s2_tile(rng, i % 2, size=16).transpose(1, 2, 0).astype(np.float32),
            "labels": [i % 2] if i % 3 else [i % 2, 2],
          },
        )

  data_dir = str(tmp_path / "tfds")
  TinyMultispectral(data_dir=data_dir).download_and_prepare()
  table = datasets.tfds_table("tiny_multispectral", data_dir=data_dir, download=False)
  assert table.image_key == "sentinel2" and len(table) == 10 and table.multilabel
  ds_labels = [
    sorted(ex["labels"].tolist())
    for ex in tfds.load(
      "tiny_multispectral", split="train", data_dir=data_dir, shuffle_files=False
    ).as_numpy_iterator()
  ]
  assert [sorted(np.flatnonzero(r).tolist()) for r in table.labels] == ds_labels
  with pytest.raises(errors.InvalidInput, match="sentinel2 images are float32.*set data.scale"):
    input_pipeline.ImageSource(table, 8, cache_dir=str(tmp_path / "c0"))
  with pytest.raises(
    errors.InvalidInput, match="band descriptions, which TFDS examples do not have"
  ):
    table.with_raster(rasters.RasterSpec.parse("B4,B3,B2", "10000"))
  with pytest.raises(errors.InvalidInput, match="asks for band 14 but the images have 13"):
    table.with_raster(rasters.RasterSpec.parse("14,3,2", "10000"))
  ds = list(
    tfds.load(
      "tiny_multispectral", split="train", data_dir=data_dir, shuffle_files=False
    ).as_numpy_iterator()
  )
  divided = table.with_raster(rasters.RasterSpec.parse("4,3,2", "10000"))
  source = input_pipeline.ImageSource(divided, 16, cache_dir=str(tmp_path / "c1"))
  want = np.clip(np.round(ds[3]["sentinel2"][..., [3, 2, 1]] / 10000 * 255), 0, 255).astype(
    np.uint8
  )
  got = next(iter(input_pipeline.eval_batches(source, np.arange(4), global_batch=4)))["image"][3]
  np.testing.assert_array_equal(got, input_pipeline.resize(want, 16).numpy())
  stretched = datasets.fit_raster(
    table.with_raster(rasters.RasterSpec.parse("4,3,2", "stretch:0,100")), np.arange(0, 10, 2)
  )
  train_b4 = np.concatenate([ds[i]["sentinel2"][..., 3].ravel() for i in range(0, 10, 2)])
  assert stretched.raster.low[0] == float(train_b4.min()) and stretched.raster.high[0] == float(
    train_b4.max()
  )


def test_all_bands_spec_reads_rgb_first_then_the_rest(tmp_path):
  path = str(tmp_path / "t.tif")
  data = s2_tile(np.random.default_rng(5), 2)
  write_tile(path, data)
  spec = rasters.RasterSpec.parse("all:B4,B3,B2", "10000")
  assert spec.all_bands and spec.bands == ("B4", "B3", "B2") and spec.divisor == 10000
  img = rasters.read(path, spec)
  order = [4, 3, 2, 1, 5, 6, 7, 8, 9, 10, 11, 12, 13]
  want = np.clip(
    np.round(data[[b - 1 for b in order]].astype(np.float32) / 10000 * 255), 0, 255
  ).astype(np.uint8)
  np.testing.assert_array_equal(img, want.transpose(1, 2, 0))
  np.testing.assert_array_equal(
    rasters.read(path, rasters.RasterSpec.parse("all:4,3,2", "10000")), img
  )
  assert (
    rasters.read(path, rasters.RasterSpec.parse("all", "10000"))[..., 0].tolist()
    == want[3].tolist()
  )
  assert rasters.check(path, spec.with_count(13, path)) == (13, tuple(order))
  with pytest.raises(
    errors.InvalidInput, match=r"t.tif: has 13 band\(s\); data.bands=all here takes 12"
  ):
    rasters.check(path, spec.with_count(12, "x"))
  for bands, message in [
    ("all:4,3", "names the 3 bands"),
    ("all:", "expected all or all:R,G,B"),
    ("all:4,4,2", "names a band twice"),
    ("4,3,2,1", "data.bands=all feeds every band"),
  ]:
    with pytest.raises(errors.InvalidInput, match=message):
      rasters.RasterSpec.parse(bands, "10000")
  meta = rasters.RasterSpec.from_meta(spec.with_count(13, path).to_meta())
  assert meta.all_bands and meta.count == 13 and meta.channels == 13


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_all_bands_end_to_end_and_saved_model_rasters_signature(s2_archive, tmp_path):
  """data.bands=all: a 13-channel stem trained and exported; encode / search read every
  band; the SavedModel takes 13-band pixels and raw float bands (its `rasters` signature,
  scaling in the graph) and gives the codes of `encode`, bit for bit; pictures and rasters
  of another band count are refused by name."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import rshash_jax  # pylint: disable=g-import-not-at-top
  from rshash_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from rshash_jax.serving import saved_model  # pylint: disable=g-import-not-at-top

  c = dhcnn_config.get_config("tiny")
  c.data.source = f"folder:{s2_archive}"
  c.data.bands, c.data.scale = "all:B4,B3,B2", "stretch"
  workdir = str(tmp_path / "w")
  res = train_dhcnn.train_and_evaluate(c, workdir)
  assert res["num_database"] + res["num_query"] == 24, res  # every tile (see above)
  enc = rshash_jax.load_encoder(workdir)
  assert (
    enc.channels == 13
    and enc.raster.all_bands
    and enc.raster.numbers == (4, 3, 2, 1, 5, 6, 7, 8, 9, 10, 11, 12, 13)
  )
  assert len(enc.raster.low) == 13
  assert enc.variables["params"]["backbone"]["conv1"]["kernel"].shape[2] == 13
  codes = commands.encode(workdir, str(s2_archive), str(tmp_path / "codes.npz"))
  z = np.load(codes)
  query = str(s2_archive / "class2" / "tile3.tif")
  hits = commands.search(workdir, codes, [query], k=3)[0]["results"]
  assert (
    len(hits) == 3 and hits[0]["distance"] == 0
  )  # the query is in the archive (ties: any order)
  # The SavedModel, read by TensorFlow alone (no JAX) in a fresh interpreter.
  out = str(tmp_path / "sm")
  saved_model.export_saved_model(workdir, out)
  files = [str(s2_archive / "class0" / "tile1.tif"), query]
  bands = []
  for p in files:
    with rasterio.open(p) as src:
      bands.append(src.read(masked=True, out_dtype="float32").filled(np.nan).transpose(1, 2, 0))
  bands[0][:3, :5] = np.nan  # nodata, as the raster's mask gives it
  pixels = np.random.default_rng(0).integers(0, 256, (2, 20, 24, 13), dtype=np.uint8)
  np.save(tmp_path / "bands.npy", np.stack(bands))
  np.save(tmp_path / "pixels.npy", pixels)
  script = r"""
import sys
sys.modules["jax"] = None
import numpy as np, tensorflow as tf
m = tf.saved_model.load(sys.argv[1])
assert sorted(m.signatures) == ["rasters", "serving_default"], sorted(m.signatures)
r = m.signatures["rasters"](bands=tf.constant(np.load(sys.argv[2])))
p = m.signatures["serving_default"](images=tf.constant(np.load(sys.argv[3])))
np.savez(sys.argv[4], rasters=r["codes"].numpy(), pixels=p["codes"].numpy())
"""
  proc = subprocess.run(
    [
      sys.executable,
      "-c",
      script,
      out,
      str(tmp_path / "bands.npy"),
      str(tmp_path / "pixels.npy"),
      str(tmp_path / "tf.npz"),
    ],
    env=dict(os.environ, CUDA_VISIBLE_DEVICES=""),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = np.load(tmp_path / "tf.npz")
  want_pixels = enc.encode(
    np.stack([input_pipeline.resize(p, enc.image_size).numpy() for p in pixels])
  )["codes"]
  np.testing.assert_array_equal(got["pixels"], want_pixels)
  paths = list(z["paths"])
  np.testing.assert_array_equal(got["rasters"][1], z["codes"][paths.index(query)])
  masked = rasters.to_uint8(
    np.ma.masked_invalid(bands[0].transpose(2, 0, 1)[[3, 2, 1, 0] + list(range(4, 13))]),
    enc.raster,
    "x",
  )
  np.testing.assert_array_equal(
    got["rasters"][0],
    enc.encode(input_pipeline.resize(masked, enc.image_size).numpy()[None])["codes"][0],
  )
  # Refused by name: a picture, and a raster of another band count.
  other = tmp_path / "other" / "a"
  other.mkdir(parents=True)
  write_tile(str(other / "x12.tif"), s2_tile(np.random.default_rng(6), 0)[:12])
  with pytest.raises(
    errors.InvalidInput, match=r"x12.tif: has 12 band\(s\); data.bands=all here takes 13"
  ):
    commands.encode(workdir, str(tmp_path / "other"), str(tmp_path / "other.npz"))
  from PIL import Image  # pylint: disable=g-import-not-at-top

  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(other / "pic.png")
  (other / "x12.tif").unlink()
  with pytest.raises(
    errors.InvalidInput, match=r"pic.png: not a GeoTIFF/TIFF raster; data.bands=all takes rasters"
  ):
    commands.encode(workdir, str(tmp_path / "other"), str(tmp_path / "other.npz"))
  with pytest.raises(
    errors.InvalidInput,
    match=r"up.png: not a GeoTIFF/TIFF raster; data.bands=all here takes "
    r"rasters of 13 bands",
  ):
    input_pipeline.decode_bytes((other / "pic.png").read_bytes(), "up.png", enc.raster)


def test_mrhash_sources_read_their_own_bands(s2_archive, tmp_path):
  """MrHash sources with their own ;bands= / ;scale=: the hash network sees B4,B3,B2
  stretched, a second source every band / 10000 through a 13-channel stem; features of
  each view differ, the exported encoder keeps the image view's reading."""
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
  import mrhash as mrhash_config  # pylint: disable=g-import-not-at-top
  from rshash_jax.data import multisource  # pylint: disable=g-import-not-at-top
  from rshash_jax.training import train_mrhash  # pylint: disable=g-import-not-at-top

  c = mrhash_config.get_config("tiny")
  c.data.source = f"folder:{s2_archive}"
  c.data.bands, c.data.scale = "B4,B3,B2", "stretch"
  c.mrhash.image_view = "full"
  c.mrhash.sources = ("full", f"folder:{s2_archive};bands=all;scale=10000")
  table, train_idx, _, image_feats, sources, bb, img_view = train_mrhash.load_data(
    c, str(tmp_path / "w0")
  )
  assert bb.preprocessing.channels == 3 and img_view.raster.bands == ("B4", "B3", "B2")
  np.testing.assert_array_equal(sources[0], image_feats)
  assert sources[1].shape == sources[0].shape and not np.allclose(sources[1], sources[0])
  v = multisource.view(table, c.mrhash.sources[1], train_idx)
  assert (
    v.raster.all_bands
    and v.raster.count == 13
    and v.raster.divisor == 10000
    and not v.raster.stretch
  )
  res = train_mrhash.train_and_evaluate(c, str(tmp_path / "w"))
  assert res["num_database"] + res["num_query"] == 24, res  # every tile (see above)
  meta = json.load(open(tmp_path / "w" / "encoder" / "encoder.json"))
  assert meta["raster"]["bands"] == ["B4", "B3", "B2"] and len(meta["raster"]["low"]) == 3
  for bad, message in [
    (";bands=4,3", "selects 2 bands"),
    (";colour=1", "is not an option"),
    (";scale=-1", "positive divisor"),
  ]:
    with pytest.raises(errors.InvalidInput, match=message):
      multisource.view(table, f"folder:{s2_archive}{bad}", train_idx)
