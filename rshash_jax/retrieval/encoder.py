"""Inference-only encoders: export a trained model, `load_encoder(path)` it anywhere.

An exported encoder is a directory:
  encoder.json   method, backbone, input size, bits, classes, preprocessing, identity
  params/        an orbax PyTree checkpoint: backbone + head variables, preprocessing arrays

`load_encoder` restores it on whatever devices exist (params replicated over a ('data',)
mesh of all local devices) and encodes uint8 images (RGB, or every band of the archive
under data.bands=all) into packed codes, predicted
classes (DHCNN) and the continuous outputs.
"""

import dataclasses
import hashlib
import json
import os
import shutil
from typing import Any, Dict, List, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from rshash_jax import config_defaults, errors
from rshash_jax.data import rasters
from rshash_jax.models import backbones, dhcnn, mrhash, signs
from rshash_jax.parallel import distributed, sharding
from rshash_jax.retrieval import hamming

FORMAT = "rshash_jax.encoder/1"


class _MrHashEncoder(nn.Module):
  """normalised backbone features / scale -> HashNet (the MrHash hash network at test time)."""

  backbone: nn.Module
  bits: int
  hidden: int = 0
  feature_norm: str = "none"

  @nn.compact
  def __call__(self, x, scale):
    f = mrhash.image_features(self.backbone, x, self.feature_norm, scale)
    h, _ = mrhash.HashNet(self.bits, self.hidden, name="hashnet")(f)
    return h, None


def _identity(meta: Dict[str, Any], tree) -> str:
  h = hashlib.sha1(
    json.dumps({k: meta[k] for k in sorted(meta) if k != "identity"}, sort_keys=True).encode()
  )
  for leaf in jax.tree.leaves(tree):
    a = np.asarray(leaf)
    h.update(str(a.shape).encode())
    h.update(np.ascontiguousarray(a).tobytes()[:4096])
  return h.hexdigest()[:16]


def params_digest(tree) -> str:
  """SHA-256 over every array of a tree of host arrays (paths, dtypes, shapes, bytes): an
  encoder's in encoder.json (checked by load_encoder), a checkpoint step's in its digest."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(f"{jax.tree_util.keystr(path)} {a.dtype} {a.shape};".encode())
    h.update(a.data)
  return h.hexdigest()


# encoder.json fields every encoder has (0.1.0 on); params_sha256 is checked when present.
REQUIRED_META = {
  "format": str,
  "method": str,
  "backbone": str,
  "image_size": int,
  "scale": (int, float),
  "bgr": bool,
  "dtype": str,
  "bits": int,
  "class_names": list,
  "hidden": int,
  "lrn_params": list,
  "identity": str,
}


def _check_meta(meta, meta_path: str):
  if not isinstance(meta, dict):
    raise errors.Corrupt(f"{meta_path}: not a JSON object")
  for field, kind in REQUIRED_META.items():
    if field not in meta:
      raise errors.Corrupt(f"{meta_path}: field {field!r} is missing")
    if not isinstance(meta[field], kind) or (kind is int and isinstance(meta[field], bool)):
      raise errors.Corrupt(f"{meta_path}: field {field!r} is {meta[field]!r}")
  if meta["method"] not in ("dhcnn", "mrhash"):
    raise errors.Corrupt(f"{meta_path}: method {meta['method']!r} is not dhcnn or mrhash")
  if not 1 <= meta["bits"] <= config_defaults.MAX_BITS or not 1 <= meta["image_size"] <= 4096:
    raise errors.Corrupt(
      f"{meta_path}: bits={meta['bits']} or image_size={meta['image_size']} out of range"
    )


def save_encoder(
  path: str,
  *,
  method: str,
  bb: backbones.Backbone,
  head_params,
  bits: int,
  class_names: Optional[List[str]] = None,
  hidden: int = 0,
  feature_scale: float = 1.0,
  feature_norm: str = "none",
  degrade: int = 1,
  extra_meta: Optional[Dict[str, Any]] = None,
  overwrite: bool = False,
) -> str:
  """Writes an encoder directory at `path` (refuses an existing path unless overwrite)."""
  path = os.path.abspath(path)
  if distributed.agree(f"encoder {path} exists", os.path.exists(path)) and not overwrite:
    raise errors.AlreadyExists(f"export path exists, nothing written: {path}")
  pre = bb.preprocessing
  tree = {
    "backbone": distributed.to_host(bb.variables),
    "head": distributed.to_host(head_params),
    "preprocess": {
      "mean": np.asarray(pre.mean, np.float32),
      "std": np.asarray(pre.std, np.float32),
    },
  }
  meta = dict(
    format=FORMAT,
    method=method,
    backbone=bb.name,
    image_size=pre.size,
    scale=pre.scale,
    bgr=pre.bgr,
    dtype=str(jnp.dtype(bb.module.dtype)),
    bits=int(bits),
    class_names=list(class_names or []),
    hidden=int(hidden),
    feature_scale=float(feature_scale),
    feature_norm=feature_norm,
    degrade=int(degrade),
    lrn_params=list(getattr(bb.module, "lrn_params", []) or []),
    **(extra_meta or {}),
  )
  meta["identity"] = _identity(meta, tree)
  meta["params_sha256"] = params_digest(tree)

  def write(tmp):
    os.makedirs(tmp)
    with _checkpointer() as ckptr:
      ckptr.save(os.path.join(tmp, "params"), tree)
      ckptr.wait_until_finished()
    with open(os.path.join(tmp, "encoder.json"), "w") as f:
      json.dump(meta, f, indent=1)
    if os.path.exists(path):  # overwrite: replaced by the complete new one
      shutil.rmtree(path)

  distributed.write_once(path, write, name="encoder")
  return path


def _checkpointer() -> ocp.StandardCheckpointer:
  """An orbax checkpointer for this process alone: an encoder is written by the primary
  process and read by every process on its own, with no barrier between processes."""
  me = jax.process_index()
  return ocp.StandardCheckpointer(
    multiprocessing_options=ocp.options.MultiprocessingOptions(
      primary_host=me, active_processes={me}
    )
  )


@dataclasses.dataclass
class Encoder:
  """A restored encoder. `encode(images)` -> dict(codes [B, W] uint32 packed, u [B, K],
  and for DHCNN logits [B, C] and predicted [B])."""

  meta: Dict[str, Any]
  module: nn.Module
  variables: Dict[str, Any]
  preprocessing: backbones.Preprocessing
  mesh: Any
  _fn: Any = None

  @property
  def bits(self) -> int:
    return self.meta["bits"]

  @property
  def image_size(self) -> int:
    return self.meta["image_size"]

  @property
  def identity(self) -> str:
    return self.meta["identity"]

  @property
  def class_names(self) -> List[str]:
    return self.meta["class_names"]

  @property
  def channels(self) -> int:
    """Bands of the images it takes: 3 (RGB), or the archive's band count (data.bands=all)."""
    return self.preprocessing.channels

  @property
  def raster(self) -> rasters.RasterSpec:
    """How this encoder's training read GeoTIFFs (bands, scaling): applied to every raster
    it encodes."""
    return rasters.RasterSpec.from_meta(self.meta.get("raster"))

  def apply_fn(self):
    """The pure function (variables, uint8 images [B, S, S, C]) -> (u, logits or None):
    preprocessing, backbone and head (jitted by `encode`, converted by the SavedModel export)."""
    pre, meta, module = self.preprocessing, self.meta, self.module

    def fn(variables, images):
      x = pre(images, jnp.dtype(meta["dtype"]))
      if meta["method"] == "dhcnn":
        return module.apply(variables, x)
      return module.apply(variables, x, meta["feature_scale"])

    return fn

  def _compiled(self):
    if self._fn is None:
      rep = sharding.replicated(self.mesh)
      self._fn = jax.jit(self.apply_fn(), in_shardings=(rep, sharding.sharded_rows(self.mesh)))
      self.variables = distributed.replicate(self.variables, self.mesh)
    return self._fn

  def encode(self, images: np.ndarray) -> Dict[str, np.ndarray]:
    images = np.asarray(images)
    shape = (self.image_size, self.image_size, self.channels)
    if images.ndim != 4 or images.shape[1:] != shape:
      raise errors.InvalidInput(
        f"expected uint8 images [B, {', '.join(map(str, shape))}], got {images.shape}"
      )
    n = images.shape[0]
    n_dev = self.mesh.devices.size
    pad = (-n) % n_dev
    if pad:
      images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
    fn = self._compiled()
    u, logits = fn(self.variables, jax.device_put(images, sharding.sharded_rows(self.mesh)))
    u = np.asarray(u, np.float32)[:n]
    out = {"u": u, "codes": hamming.pack_codes(signs.signs(np.asarray(u)))}
    if logits is not None:
      out["logits"] = np.asarray(logits, np.float32)[:n]
      out["predicted"] = out["logits"].argmax(axis=1)
    return out


def load_encoder(path: str, devices=None) -> Encoder:
  """Restores an exported encoder (see module docstring) over all local devices."""
  path = os.path.abspath(path)
  meta_path = os.path.join(path, "encoder.json")
  if not os.path.isfile(meta_path):
    # A training workdir holds its encoder in WORKDIR/encoder.
    if os.path.isfile(os.path.join(path, "encoder", "encoder.json")):
      return load_encoder(os.path.join(path, "encoder"), devices)
    raise errors.NotFound(f"not an exported encoder (no encoder.json): {path}")
  try:
    with open(meta_path) as f:
      meta = json.load(f)
  except ValueError as e:
    raise errors.Corrupt(f"{meta_path}: not valid JSON ({e})") from None
  if isinstance(meta, dict) and meta.get("format") != FORMAT:
    raise errors.InvalidInput(
      f"{meta_path}: unknown encoder format {meta.get('format')!r} (expected {FORMAT})"
    )
  _check_meta(meta, meta_path)
  try:
    with _checkpointer() as ckptr:
      tree = ckptr.restore(os.path.join(path, "params"))
    tree = jax.device_get(tree)
  except Exception as e:  # pylint: disable=broad-except  (truncated or missing files)
    raise errors.Corrupt(
      f"{path}/params: cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    ) from None
  if "params_sha256" in meta and params_digest(tree) != meta["params_sha256"]:
    raise errors.Corrupt(
      f"{path}/params: the parameters do not match the SHA-256 in encoder.json: the encoder "
      "is corrupt; export it again from its training workdir"
    )
  module, pre, _ = backbones.build(
    meta["backbone"],
    image_size=meta["image_size"],
    dtype=jnp.dtype(meta["dtype"]),
    lrn_params=tuple(meta["lrn_params"]) or None,
    channels=rasters.RasterSpec.from_meta(meta.get("raster")).channels,
  )
  pre = dataclasses.replace(
    pre,
    mean=np.asarray(tree["preprocess"]["mean"]),
    std=np.asarray(tree["preprocess"]["std"]),
    scale=meta["scale"],
    bgr=meta["bgr"],
  )
  bb_vars = tree["backbone"]
  if meta["method"] == "dhcnn":
    model = dhcnn.DHCNN(
      backbone=module,
      bits=meta["bits"],
      num_classes=len(meta["class_names"]),
      hidden=meta["hidden"],
      dtype=jnp.dtype(meta["dtype"]),
    )
    head = "head"
  else:
    model = _MrHashEncoder(module, meta["bits"], meta["hidden"], meta.get("feature_norm", "none"))
    head = "hashnet"
  bb_params, constants = backbones.nest(bb_vars)
  variables = {"params": {"backbone": bb_params, head: tree["head"]}, **constants}
  mesh = sharding.data_mesh(devices if devices is not None else jax.local_devices())
  return Encoder(meta, model, variables, pre, mesh)
