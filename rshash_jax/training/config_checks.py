"""Config validation before any long work: every error names the field and the value."""

from rshash_jax import config_defaults, errors
from rshash_jax.data import features, multisource, rasters
from rshash_jax.models import backbones, dhcnn, mrhash
from rshash_jax.training import train_state

MODES = ("frozen", "finetune")
DTYPES = ("float32", "bfloat16", "float16")


def _fail(field, value, want):
  raise errors.InvalidInput(f"config.{field}={value!r} is invalid: {want}")


def _positive_int(cfg, field, limit=None):
  v = _get(cfg, field)
  if isinstance(v, bool) or not isinstance(v, int) or v < 1:
    _fail(field, v, "expected a positive integer")
  if limit is not None and v > limit:
    raise errors.TooLarge(
      f"config.{field}={v} is over the limit of {limit} (rshash_jax.config_defaults)"
    )


def _choice(cfg, field, choices):
  v = _get(cfg, field)
  if v not in choices:
    _fail(field, v, f"expected one of {', '.join(map(str, choices))}")


def _range(cfg, field, lo, hi, lo_open=False):
  v = _get(cfg, field)
  if (
    not isinstance(v, (int, float))
    or isinstance(v, bool)
    or v > hi
    or v < lo
    or (lo_open and v == lo)
  ):
    _fail(field, v, f"expected a number in {'(' if lo_open else '['}{lo}, {hi}]")


def _open_fraction(cfg, field, why_not_one):
  """A share in (0, 1): 0 and 1 would leave one side of a split empty."""
  _range(cfg, field, 0.0, 1.0, lo_open=True)
  if _get(cfg, field) == 1.0:
    _fail(field, 1.0, why_not_one)


def _get(cfg, field):
  node = cfg
  for part in field.split("."):
    if part not in node:
      raise errors.InvalidInput(f"config.{field} is missing")
    node = node[part]
  return node


# eval.reference: the float embedding of neighbour recall and the unseen-class references:
# the model's backbone as created (pretrained, frozen: model-independent), or none.
REFERENCES = ("backbone", "none")


def check_common(config):
  """Fields shared by every method."""
  src = _get(config, "data.source")
  if not isinstance(src, str) or not (
    src in ("auto", "generated") or src.startswith(("folder:", "tfds:", "scenes:"))
  ):
    _fail(
      "data.source", src, "expected 'auto', 'generated', 'folder:DIR', 'scenes:DIR' or 'tfds:NAME'"
    )
  _open_fraction(config, "data.train_ratio", "the test split would be empty")
  if _get(config, "data.validation") != 0.0:
    _open_fraction(config, "data.validation", "the database would be empty")
  if _get(config, "data.unseen_classes") != 0.0:
    _open_fraction(config, "data.unseen_classes", "no class would be left to train on")
  _choice(config, "eval.reference", REFERENCES)
  _choice(config, "model.backbone", backbones.NAMES)
  _choice(config, "model.dtype", DTYPES)
  _positive_int(config, "model.bits", config_defaults.MAX_BITS)
  _positive_int(config, "train.epochs", config_defaults.MAX_EPOCHS)
  for f in ("train.batch_size", "eval.batch_size", "features.batch_size"):
    _positive_int(config, f, config_defaults.MAX_BATCH)
  for f in ("train.log_every_steps", "train.checkpoint_every_steps"):
    _positive_int(config, f)
  if "bands" in config.data or "scale" in config.data:
    rasters.RasterSpec.parse(config.data.get("bands", ""), config.data.get("scale", ""))
  threads = _get(config, "data.threads")
  if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
    _fail("data.threads", threads, "expected 0 (the host's cores) or a positive number of threads")
  _choice(config, "train.optimizer", train_state.OPTIMIZERS)
  _choice(config, "train.schedule", train_state.SCHEDULES)
  _range(config, "train.lr_start", 0.0, float("inf"), lo_open=True)
  _range(config, "train.lr_end", 0.0, float("inf"), lo_open=True)
  _range(config, "train.weight_decay", 0.0, 1.0)
  if config.model.backbone == "tiny_cnn" and config.model.pretrained:
    _fail(
      "model.pretrained", True, "tiny_cnn has no pretrained weights; set model.pretrained=False"
    )


def check_dhcnn(config):
  check_common(config)
  _choice(config, "train.mode", MODES)
  _range(config, "dhcnn.eta", 0.0, 1.0)
  _range(config, "dhcnn.beta", 0.0, 1e6)
  _range(config, "dhcnn.theta_scale", 0.0, 1e3, lo_open=True)
  _choice(config, "dhcnn.gradient", dhcnn.GRADIENTS)
  _choice(config, "dhcnn.ce_to_classifier", dhcnn.CE_MODES)
  _range(config, "dhcnn.center_weight", 0.0, 1e6)
  _range(config, "dhcnn.distill_weight", 0.0, 1e6)
  _range(config, "dhcnn.center_margin", 0.0, 0.5)
  _choice(config, "dhcnn.distill", dhcnn.DISTILL_KINDS)
  _range(config, "dhcnn.distill_temperature", 0.0, 10.0, lo_open=True)
  _range(config, "dhcnn.distill_label_boost", 0.0, 10.0)
  check_finetune_from(config)


FINETUNE_CACHE = ("auto", "yes", "no")


def check_finetune_from(config):
  """train.finetune_from (a split point of the backbone, with mode=finetune), finetune_cache,
  cached_views."""
  point = _get(config, "train.finetune_from")
  if not point:
    return
  if config.train.mode != "finetune":
    _fail(
      "train.finetune_from",
      point,
      f"it needs train.mode=finetune (train.mode is {config.train.mode!r})",
    )
  name = config.model.backbone
  points = backbones.split_points(name)
  if not points:
    _fail(
      "train.finetune_from",
      point,
      "partial fine-tuning needs a backbone with split points "
      f"(efficientnet_lite0..4, tiny_cnn), not {name}",
    )
  if point not in points:
    _fail(
      "train.finetune_from",
      point,
      f"expected a split point of {name}: "
      + (f"{points[0]} .. {points[-2]}, {points[-1]}" if len(points) > 2 else ", ".join(points)),
    )
  _choice(config, "train.finetune_cache", FINETUNE_CACHE)
  _positive_int(config, "train.cached_views")
  _range(config, "train.cached_views", 1, len(features.DIHEDRAL))


def check_mrhash(config):
  """MrHash fields; data.source may also be release:DIR (the MrHash release format)."""
  if _get(config, "data.unseen_classes") != 0.0:
    _fail(
      "data.unseen_classes", config.data.unseen_classes, "is measured for DHCNN only; set it to 0"
    )
  src = _get(config, "data.source")
  if isinstance(src, str) and src.startswith("release:"):
    config = config.copy_and_resolve_references()
    config.unlock()
    config.data.source = "generated"  # the rest of check_common applies unchanged
  check_common(config)
  _choice(config, "train.mode", MODES)
  check_finetune_from(config)
  _positive_int(config, "mrhash.num_clusters")
  _positive_int(config, "mrhash.kmeans_n_init")
  if "kmeans" in config.mrhash:
    _choice(config, "mrhash.kmeans", ("auto", "exact", "streamed"))
  _positive_int(config, "mrhash.ae_epochs")
  _positive_int(config, "mrhash.ae_batch_size")
  _positive_int(config, "eval.map_at_r")
  _choice(config, "mrhash.kl_reduction", mrhash.KL_REDUCTIONS)
  for field in ("mrhash.pair_weight", "mrhash.quant_weight", "mrhash.balance_weight"):
    _range(config, field, 0.0, 1e6)
  _choice(config, "mrhash.baseline", ("", "lsh", "itq"))
  _choice(config, "mrhash.hash_init", ("random", "itq"))
  if config.mrhash.hash_init == "itq" and config.model.head_hidden:
    _fail("mrhash.hash_init", "itq", "starts a linear hash layer at ITQ; set model.head_hidden=0")
  _choice(config, "mrhash.feature_norm", mrhash.FEATURE_NORMS)
  if len(_get(config, "mrhash.sources")) < 1:
    _fail("mrhash.sources", config.mrhash.sources, "expected one or more source views")
  for spec in list(config.mrhash.sources) + [config.mrhash.image_view]:
    spec, options = multisource.split_view(spec)
    rasters.RasterSpec.parse(options.get("bands", ""), options.get("scale", ""))
    if not (
      spec == "full"
      or spec.startswith("folder:")
      or (spec.startswith("coarse") and spec[6:].isdigit() and int(spec[6:]) >= 1)
    ):
      _fail("mrhash.sources/image_view", spec, "expected full, coarseN or folder:DIR")
