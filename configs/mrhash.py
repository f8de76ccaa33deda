r"""MrHash (Sun et al., TGRS 2022): unsupervised multisource hashing.

Commands:

  # Offline default: UC Merced (../shared, else generated scenes) with a simulated second
  # source: the hash network sees a 4x coarser view (source 1, like a lower-resolution
  # sensor); source 2 is the full-resolution image. Frozen EfficientNet-Lite0 features.
  python -m rshash_jax.main --config=configs/mrhash.py:local --workdir=/tmp/mrhash
  # The MrHash release format (train.txt/test.txt + {split}_{source}.npy per source):
  python -m rshash_jax.main --config=configs/mrhash.py --config.data.source=release:/data/mrhash_eurosat \
      --config.mrhash.release_sources=msi,vhr --config.eval.map_at_r=1900 --workdir=/tmp/mrhash_eurosat
  # Baselines on the same features: presets lsh, itq; ablation: unisource.
  python -m rshash_jax.main --config=configs/mrhash.py:local,itq --workdir=/tmp/itq

Presets (comma-separated): local, tiny, unisource, lsh, itq, bits=N.

Departures from the official code, each a config choice (the sound one is the default):
  mrhash.kl_reduction = "batchmean" (KL per sample, the definition; default) or "mean"
      (the official code's average over batch*16 elements, 16x smaller).
  Checkpoint selection: the official code picks the AE checkpoint by test-set mAP; we
      always take the last one (no test labels are ever looked at during training).
  The backbone is frozen (features cached); the paper fine-tunes AlexNet at lr 1e-5.
  Features of each source are divided by their root-mean-square over the training set.

Measured here (2-core CPU, ../shared/data/ucmerced 80/20, coarse4 view + full image,
benchmarks/mrhash_ucmerced.py; mAP@100 / mAP):
  32 bits: LSH 0.3845/0.2515, ITQ 0.6572/0.5408, MrHash-unisource 0.5728/0.5268,
           MrHash-multisource 0.5818/0.5324 (~40 s of training each)
  64 bits: LSH 0.4885/0.3210, ITQ 0.6768/0.5500, MrHash-unisource 0.5740/0.5387,
           MrHash-multisource 0.5900/0.5458
  configs/mrhash.py:tiny: ~30 s on generated scenes.
"""

import ml_collections

from rshash_jax import config_defaults, metrics


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.method = "mrhash"
  c.seed = 0

  c.data = config_defaults.data()

  c.model = config_defaults.model()

  c.mrhash = ml_collections.ConfigDict()
  c.mrhash.image_view = "coarse4"            # what the hash network sees (train and test)
  c.mrhash.sources = ("coarse4", "full")     # source 1 (AE input) first; views of the images
  c.mrhash.release_sources = ("msi", "vhr")  # release format: feature-file source names
  c.mrhash.num_clusters = 16
  c.mrhash.kmeans_n_init = 20
  c.mrhash.ae_epochs = 200
  c.mrhash.ae_batch_size = 512
  c.mrhash.ae_lr = 1e-3
  c.mrhash.ae_lr_halve_epochs = 40
  c.mrhash.recon_weight = 5.0
  c.mrhash.kl_reduction = "batchmean"        # batchmean (sound) | mean (official)
  c.mrhash.baseline = ""                     # "" (MrHash) | lsh | itq
  c.mrhash.hash_init = "random"              # random (paper) | itq: hash layer starts at ITQ

  c.train = config_defaults.train()    # stage 2
  c.train.epochs = 51
  c.train.batch_size = 128
  c.train.optimizer = "adam"
  c.train.schedule = "step"             # lr x 0.7 every 10 epochs
  c.train.lr_start = 1e-3
  c.train.lr_decay = 0.7
  c.train.lr_decay_epochs = 10
  c.train.weight_decay = 0.0
  c.train.log_every_steps = 50
  c.train.checkpoint_every_steps = 500

  c.features = config_defaults.features()

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 64
  c.eval.map_at_r = 100                      # 1900 for EuroSAT (paper), 9375 for DSRSID
  c.eval.map_ks = (100,)
  c.eval.ks = metrics.DHCNN_KS

  for item in filter(None, (a.strip() for a in arg.split(","))):
    if item.startswith("bits="):
      c.model.bits = int(item[5:])
    elif item == "local":
      c.data.source = "auto"
    elif item == "unisource":
      c.mrhash.sources = (c.mrhash.image_view, c.mrhash.image_view)
    elif item in ("lsh", "itq"):
      c.mrhash.baseline = item
    elif item == "tiny":
      c.data.source = "generated"
      c.data.generated_size = 32
      c.data.generated_per_class = 10
      c.model.backbone = "tiny_cnn"
      c.model.pretrained = False
      c.model.bits = 16
      c.mrhash.image_view = "coarse2"
      c.mrhash.sources = ("coarse2", "full")
      c.mrhash.num_clusters = 4
      c.mrhash.kmeans_n_init = 2
      c.mrhash.ae_epochs = 4
      c.mrhash.ae_batch_size = 16
      c.train.epochs = 3
      c.train.batch_size = 8
      c.train.log_every_steps = 5
      c.train.checkpoint_every_steps = 5
      c.eval.map_at_r = 10
      c.eval.map_ks = (10,)
      c.eval.ks = (1, 5, 10)
    else:
      raise ValueError(f"unknown preset {item!r}; choose from local, tiny, unisource, lsh, itq, bits=N")
  return c
