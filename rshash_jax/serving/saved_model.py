"""An encoder as a TensorFlow SavedModel: images in, packed codes and class scores out.

  python -m rshash_jax.main export --workdir=/tmp/dhcnn --out=/tmp/dhcnn_sm --format=saved_model

The model is the encoder of `rshash_jax.load_encoder` converted by orbax-export (jax2tf
with native serialisation: the same StableHLO that JAX compiles, run by TensorFlow's XLA),
with the input pipeline's own preprocessing in front (`input_pipeline.resize`: optional
degrade, antialiased bicubic resize to the input size, rounding to uint8; then the
backbone's normalisation inside the JAX function). Signatures, any batch size:

  serving_default  images: uint8 [B, H, W, C], any H and W (one size per batch); C = 3,
                   or the archive's band count for an encoder trained with data.bands=all
                   (R, G, B first, then the other bands in raster order)
  encoded          image_bytes: string [B], PNG / JPEG / BMP / GIF file contents
                   (what tf.io.decode_image reads; WebP and TIFF are not among them);
                   RGB encoders only
  rasters          bands: float32 [B, H, W, N], every band of a raster in its order, as
                   `rasterio.open(f).read(masked=True).filled(nan).transpose(1, 2, 0)` gives
                   them (NaN = nodata); only for encoders trained on rasters (or TFDS
                   arrays). The encoder's own band choice and scaling (data.bands /
                   data.scale, a fitted stretch included) run in the graph, exactly as
                   `rasters.read` does them, so codes match the `encode` command's.
                   Bands named by description (B4,B3,B2) are taken by the numbers they had
                   in the training archive's first raster (`raster.numbers` in the metadata).

both returning codes uint32 [B, ceil(bits / 32)] (the packed layout of codes files, LSB
first), u float32 [B, bits] (the continuous outputs) and, for DHCNN, logits float32
[B, classes] and predicted int32 [B]. `assets.extra/encoder.json` holds the encoder's
metadata (bits, classes, identity: codes files encoded by it carry the same identity).

Serve it with TensorFlow Serving (`tensorflow_model_server --model_base_path=DIR_PARENT`,
the export in a numbered version folder) or load it anywhere TensorFlow runs:
`tf.saved_model.load(DIR).signatures["encoded"](image_bytes=...)`; no JAX needed.
"""

import json
import os

from rshash_jax import errors
from rshash_jax.data import input_pipeline
from rshash_jax.parallel import distributed
from rshash_jax.retrieval import encoder as encoder_lib, hamming


def _jax_function(enc: encoder_lib.Encoder):
  """(variables, uint8 images [B, S, S, C]) -> dict of outputs, as Encoder.encode computes them."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  apply = enc.apply_fn()

  def fn(variables, images):
    u, logits = apply(variables, images)
    u = u.astype(jnp.float32)
    out = {"codes": hamming.pack_signs(u), "u": u}
    if logits is not None:
      out["logits"] = logits.astype(jnp.float32)
      out["predicted"] = jnp.argmax(out["logits"], axis=1).astype(jnp.int32)
    return out

  return fn


def export_saved_model(encoder_path: str, out: str) -> str:
  """Writes the encoder at `encoder_path` (an export or a training workdir) as a SavedModel
  directory `out` (never overwrites)."""
  if distributed.agree(f"export {out} exists", os.path.exists(out)):
    raise errors.AlreadyExists(f"export path exists, nothing written: {out}")
  enc = encoder_lib.load_encoder(encoder_path)
  distributed.write_once(os.path.abspath(out), lambda tmp: _write(enc, tmp), name="SavedModel")
  return out


def raster_preprocessor(spec, size: int, degrade: int = 1):
  """TF function float32 [H, W, N] (all bands, NaN = nodata) -> uint8 [size, size, C]: the
  graph form of `rasters.read` (band choice and scaling of `spec`) + `input_pipeline.resize`."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  idx = [int(n) - 1 for n in spec.numbers]
  lo = np.asarray(spec.low, np.float32)
  span = np.maximum(np.asarray(spec.high, np.float32) - lo, np.float32(1e-12))

  def prep(bands):
    x = tf.gather(tf.cast(bands, tf.float32), idx, axis=-1)
    valid = tf.math.is_finite(x)
    x = tf.where(valid, x, 0.0)
    if spec.divisor:
      x = x / spec.divisor * 255.0
    elif spec.stretch:
      x = (x - lo) / span * 255.0
    x = tf.where(valid, x, 0.0)
    img = tf.cast(tf.clip_by_value(tf.round(x), 0, 255), tf.uint8)
    if len(idx) == 1:
      img = tf.tile(img, [1, 1, 3])
    return input_pipeline.resize(img, size, None, degrade)

  return prep


def _write(enc: encoder_lib.Encoder, path: str):
  import jax  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from orbax import export as oex  # pylint: disable=g-import-not-at-top

  size, degrade, c = enc.image_size, int(enc.meta.get("degrade", 1)), enc.channels
  variables = jax.device_get(enc.variables)
  module = oex.JaxModule(
    variables, _jax_function(enc), trainable=False, input_polymorphic_shape="(b, ...)"
  )

  def resize_batch(images):
    return tf.map_fn(
      lambda im: input_pipeline.resize(im, size, None, degrade),
      images,
      fn_output_signature=tf.TensorSpec([size, size, c], tf.uint8),
    )

  def decode_batch(image_bytes):
    def one(b):
      img = tf.io.decode_image(b, channels=3, expand_animations=False, dtype=tf.uint8)
      img.set_shape([None, None, 3])
      return input_pipeline.resize(img, size, None, degrade)

    return tf.map_fn(one, image_bytes, fn_output_signature=tf.TensorSpec([size, size, 3], tf.uint8))

  configs = [
    oex.ServingConfig(
      "serving_default",
      input_signature=[tf.TensorSpec([None, None, None, c], tf.uint8, name="images")],
      tf_preprocessor=resize_batch,
    )
  ]
  if c == 3:
    configs.append(
      oex.ServingConfig(
        "encoded",
        input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")],
        tf_preprocessor=decode_batch,
      )
    )
  spec = enc.raster
  if spec.numbers:
    one_raster = raster_preprocessor(spec, size, degrade)

    def raster_batch(bands):
      return tf.map_fn(
        one_raster, bands, fn_output_signature=tf.TensorSpec([size, size, c], tf.uint8)
      )

    configs.append(
      oex.ServingConfig(
        "rasters",
        input_signature=[tf.TensorSpec([None, None, None, None], tf.float32, name="bands")],
        tf_preprocessor=raster_batch,
      )
    )
  oex.ExportManager(module, configs).save(path)
  os.makedirs(os.path.join(path, "assets.extra"), exist_ok=True)
  with open(os.path.join(path, "assets.extra", "encoder.json"), "w") as f:
    json.dump(
      dict(
        enc.meta,
        saved_model_outputs=sorted(
          ["codes", "u"] + (["logits", "predicted"] if enc.meta["method"] == "dhcnn" else [])
        ),
      ),
      f,
      indent=1,
    )
