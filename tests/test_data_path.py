"""The data path at archive scale: chunk stores, TF/PIL decoding, TFDS streamed into a store."""

import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from rshash_jax.data import chunk_store, datasets, input_pipeline


def _store(tmp_path, n=10, chunk=4, key="k1"):
  return chunk_store.ChunkStore(
    str(tmp_path / "s"), n, {"x": ((3,), "float32"), "y": ((), "int32")}, chunk=chunk, key=key
  )


def _rows(start, stop):
  r = np.arange(start, stop)
  return {"x": np.stack([r, 2 * r, 3 * r], 1).astype(np.float32), "y": r.astype(np.int32)}


def test_chunk_store_builds_resumes_and_maps_read_only(tmp_path):
  calls = []

  def interrupted(start, stop):
    if calls:
      raise KeyboardInterrupt("killed")
    calls.append((start, stop))
    return _rows(start, stop)

  with pytest.raises(KeyboardInterrupt):
    _store(tmp_path).build(interrupted)
  assert not _store(tmp_path).complete()
  assert sorted(os.listdir(tmp_path / "s" / "chunks")) == ["key.json", "part_000000.npz"]
  # Another key or chunking never mixes with the partial build.
  with pytest.raises(ValueError, match="partial build of other data"):
    _store(tmp_path, key="k2").build(_rows)
  with pytest.raises(ValueError, match="partial build of other data"):
    _store(tmp_path, chunk=5).build(_rows)
  done = []
  out = _store(tmp_path).build(lambda a, b: done.append((a, b)) or _rows(a, b))
  assert done == [(4, 8), (8, 10)]  # chunk 0 was kept
  np.testing.assert_array_equal(out["y"], np.arange(10))
  np.testing.assert_array_equal(out["x"][:, 2], 3 * np.arange(10))
  assert isinstance(out["x"], np.memmap) and not out["x"].flags.writeable
  assert not (tmp_path / "s" / "chunks").exists()
  again = _store(tmp_path).build(lambda a, b: pytest.fail("recomputed a complete store"))
  np.testing.assert_array_equal(again["y"], out["y"])
  with pytest.raises(ValueError, match="store of other data"):
    _store(tmp_path, key="k2").build(_rows)


def _write(path, pixels):
  Image.fromarray(pixels).save(path, **({"lossless": True} if path.endswith(".webp") else {}))


def test_tf_and_pil_decoders_feed_the_same_pixels(tmp_path):
  """PNG/JPEG/BMP go through TF ops, WebP/TIFF through PIL; the resize after them is one."""
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)
  for ext in ("png", "bmp", "webp", "tif"):
    _write(str(tmp_path / f"a.{ext}"), pixels)
  ref = input_pipeline.load_image(str(tmp_path / "a.png"), 32)
  for ext in ("bmp", "webp", "tif"):
    np.testing.assert_array_equal(
      input_pipeline.load_image(str(tmp_path / f"a.{ext}"), 32), ref, err_msg=ext
    )
  np.testing.assert_array_equal(
    input_pipeline.decode_file(str(tmp_path / "a.webp")).numpy(), pixels
  )
  square = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
  _write(str(tmp_path / "sq.png"), square)
  np.testing.assert_array_equal(
    input_pipeline.load_image(str(tmp_path / "sq.png"), 32), square
  )  # no-op resize
  # The pipeline gives exactly load_image's pixels (what `search` encodes for a query).
  for c in ("c0", "c1"):
    (tmp_path / "tree" / c).mkdir(parents=True)
    for ext in ("png", "webp"):
      _write(str(tmp_path / "tree" / c / f"a.{ext}"), pixels)
  table = datasets.class_folder(str(tmp_path / "tree"))
  source = input_pipeline.ImageSource(table, 32)
  batches = list(input_pipeline.eval_batches(source, table.ids, global_batch=4, threads=2))
  for b in batches:
    for img, i in zip(b["image"], b["id"]):
      np.testing.assert_array_equal(img, input_pipeline.load_image(table.paths[i], 32))
  assert input_pipeline.default_threads() >= 1


def test_a_truncated_png_is_named_by_the_pipeline(tmp_path):
  rng = np.random.default_rng(1)
  for c in ("c0", "c1"):
    (tmp_path / c).mkdir()
    for i in range(5):
      _write(str(tmp_path / c / f"{i}.png"), rng.integers(0, 256, (24, 24, 3), dtype=np.uint8))
  bad = tmp_path / "c1" / "3.png"
  bad.write_bytes(bad.read_bytes()[:120])  # the header survives: the up-front check passes
  table = datasets.class_folder(str(tmp_path))
  source = input_pipeline.ImageSource(table, 16)
  with pytest.raises(ValueError, match=r"corrupt or unreadable image: .*c1/3\.png"):
    list(input_pipeline.eval_batches(source, table.ids, global_batch=4))
  with pytest.raises(ValueError, match=r"corrupt or unreadable image: .*c1/3\.png"):
    list(input_pipeline.train_batches(source, table.ids, global_batch=4, seed=0, num_steps=5))


class TinyScenes(tfds.core.GeneratorBasedBuilder):
  """A TFDS image-classification builder written by the test (no download)."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(None, None, 3)),
          "label": tfds.features.ClassLabel(names=["a", "b", "c"]),
        }
      ),
    )

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    rng = np.random.default_rng(0)
    for i in range(23):
      yield i, {"image": rng.integers(0, 256, (20 + i % 3, 24, 3), dtype=np.uint8), "label": i % 3}


def test_tfds_split_is_streamed_into_an_image_store(tmp_path):
  data_dir = str(tmp_path / "tfds")
  TinyScenes(data_dir=data_dir).download_and_prepare()
  table = datasets.tfds_table("tiny_scenes", data_dir=data_dir, download=False)
  ds = tfds.load("tiny_scenes", split="train", data_dir=data_dir, shuffle_files=False)
  assert len(table) == 23 and table.labels.tolist() == [
    int(ex["label"]) for ex in ds
  ]  # the stored order
  source = input_pipeline.ImageSource(table, 16, cache_dir=str(tmp_path / "cache"))
  stores = os.listdir(tmp_path / "cache")
  assert len(stores) == 1 and stores[0].startswith("images_tiny_scenes_")
  assert isinstance(source._images, np.memmap)  # pylint: disable=protected-access
  want = [input_pipeline.resize(ex["image"], 16).numpy() for ex in ds]
  seen = 0
  for b in input_pipeline.eval_batches(source, table.ids, global_batch=8):
    for img, i, m in zip(b["image"], b["id"], b["mask"]):
      if m:
        np.testing.assert_array_equal(img, want[i])
        seen += 1
  assert seen == 23
  with pytest.raises(ValueError, match="needs a cache directory"):
    input_pipeline.ImageSource(table, 16)
  assert tf.executing_eagerly()
