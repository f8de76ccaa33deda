"""Config blocks shared by every method's config file (configs/*.py)."""

import os
from typing import Callable, Dict

import ml_collections

from rshash_jax import errors

# Cut-offs of the precision/recall-at-k curves of the DHCNN paper (1, 11, 21, 31, 50, 100, ...,
# 1000).
# Limits on values that size allocations (each error names its limit): a code length past
# MAX_BITS asks for a hash layer and memory bank of gigabytes (bits=100000000: 38 GB).
MAX_BITS = 4096
MAX_BATCH = 1 << 16  # images per global batch (train, eval, features, encode)
MAX_EPOCHS = 100_000

DHCNN_KS = (1, 11, 21, 31) + tuple(range(50, 1001, 50))


def data() -> ml_collections.ConfigDict:
  d = ml_collections.ConfigDict()
  d.source = "tfds:uc_merced"  # auto | generated | folder:DIR | scenes:DIR | tfds:NAME
  # (MrHash also release:DIR)
  d.name = ""  # display name (default: folder/TFDS name)
  d.image_root = ""  # MrHash release format: image paths relative to this (default DIR)
  d.train_ratio = 0.8  # per-class split (UCMD 0.8, AID 0.5)
  d.validation = 0.0  # >0: evaluate on this share of the training part (test unused)
  d.unseen_classes = 0.0  # >0: this seeded share of the classes is held out of training;
  # their images are ranked among themselves (results' unseen_map)
  d.seed = 0
  d.manual_dir = ""  # TFDS manual dir (e.g. UCMerced_LandUse.zip)
  d.tfds_data_dir = ""
  d.tfds_split = "train"
  d.download = True
  d.resize_size = 0  # 0: resize straight to the input size; 256: resize, centre-crop
  d.augment = False  # flips / 90-degree rotations (fine-tuning)
  d.threads = 0  # tf.data decode threads; 0 = the host's cores
  d.labels_file = ""  # multi-label CSV (path,label1;label2) for data.source=folder:DIR
  d.bands = ""  # GeoTIFF bands: "" (1,2,3), "4,3,2", "B4,B3,B2", or all[:R,G,B] (rasters.py)
  d.scale = ""  # GeoTIFF values to 0..255: "" (8-bit as is), "10000", "stretch[:2,98]"
  # data.source=scenes:DIR (rasters of any size, cut into windows; rshash_jax/data/scenes.py)
  d.tile = ""  # window size: output pixels (256) or metres (2560m)
  d.stride = ""  # step between windows, in the unit of data.tile ("" = data.tile)
  d.gsd = ""  # metres per output pixel ("" = each scene's own)
  d.scene_labels = ""  # labelled points / polygons (GeoJSON, GeoPackage, ...: pyogrio)
  d.scene_label_field = "class"  # the label file's field holding the class name
  d.generated_classes = 6
  d.generated_per_class = 20
  d.generated_size = 64
  return d


def model() -> ml_collections.ConfigDict:
  m = ml_collections.ConfigDict()
  m.backbone = "efficientnet_lite0"
  m.pretrained = True
  m.weights_path = ""  # local weights file; "" = the weights package's file
  m.image_size = 0  # 0: the backbone's own input size
  m.bits = 64
  m.head_hidden = 0  # 0: a linear hash layer on the features (the papers)
  m.dropout = 0.0
  m.dtype = "float32"  # bfloat16 on TPU
  return m


def train() -> ml_collections.ConfigDict:
  t = ml_collections.ConfigDict()
  t.mode = "frozen"  # frozen | finetune
  t.epochs = 100
  t.batch_size = 10  # global, over all devices
  t.optimizer = "sgd"  # sgd | momentum | adam | adamw
  t.momentum = 0.9  # used by 'momentum'
  t.schedule = "log_epoch"  # log_epoch | constant | cosine | step
  t.lr_start = 1e-2
  t.lr_end = 1e-5
  t.lr_decay = 0.5  # 'step' schedule: lr x lr_decay every lr_decay_epochs
  t.lr_decay_epochs = 40
  t.weight_decay = 5e-4
  t.grad_clip = 0.0
  t.backbone_lr_mult = 1.0
  t.log_every_steps = 100
  t.checkpoint_every_steps = 1000
  t.max_steps_per_run = 0  # >0: stop (checkpointed) after this many steps; rerun resumes
  t.init_head_from = ""  # DHCNN: a finished run's workdir/export whose head starts this one
  t.finetune_from = (
    ""  # finetune: "" trains the whole backbone; blocks_N / head (EfficientNet-Lite)
  )
  # trains that layer and above, the layers below frozen
  t.finetune_cache = (
    "auto"  # with finetune_from: auto (on CPU) | yes | no: compute the frozen layers'
  )
  # activations once (a chunk store) or in every step
  t.cached_views = 4  # with the cache and data.augment: dihedral views cached per image (1..8)
  return t


def features() -> ml_collections.ConfigDict:
  f = ml_collections.ConfigDict()
  f.cache_dir = ""  # frozen backbones: "" = WORKDIR/cache
  f.batch_size = 32
  return f


def cache_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Where features, activations and TFDS image stores are cached: features.cache_dir,
  else WORKDIR/cache."""
  return config.features.cache_dir or os.path.join(workdir, "cache")


def scratch_dir(workdir: str) -> str:
  """Where a run's scratch arrays go (rshash_jax/scratch.py: unnamed memory-mapped files)."""
  return os.path.join(workdir, "tmp")


def apply_presets(
  c: ml_collections.ConfigDict,
  arg: str,
  named: Dict[str, Callable[[ml_collections.ConfigDict], None]],
  keyed: Dict[str, Callable[[ml_collections.ConfigDict, str], None]],
):
  """Applies `file.py:ARGS` presets in order: comma-separated names (`named`) and key=value
  items (`keyed`); anything else is refused with the choices."""
  for item in filter(None, (a.strip() for a in arg.split(","))):
    key, eq, value = item.partition("=")
    if eq and key in keyed:
      keyed[key](c, value)
    elif not eq and item in named:
      named[item](c)
    else:
      choices = ", ".join(list(named) + [f"{k}=" for k in keyed])
      raise errors.InvalidInput(f"unknown preset {item!r}; choose from {choices}")
