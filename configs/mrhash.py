r"""MrHash (Sun et al., TGRS 2022): unsupervised multisource hashing.

Commands:

  # Offline default: UC Merced (../shared, else generated scenes) with a simulated second
  # source: the hash network sees a 4x coarser view (source 1, like a lower-resolution
  # sensor); source 2 is the full-resolution image. Frozen EfficientNet-Lite0 features.
  python -m rshash_jax.main --config=configs/mrhash.py:local --workdir=/tmp/mrhash
  # The MrHash release format (train.txt/test.txt + {split}_{source}.npy per source), with
  # the paper's 16 clusters for EuroSAT:
  python -m rshash_jax.main --config=configs/mrhash.py \
      --config.data.source=release:/data/mrhash_eurosat \
      --config.mrhash.release_sources=msi,vhr --config.eval.map_at_r=1900 \
      --config.mrhash.num_clusters=16 --workdir=/tmp/mrhash_eurosat
  # Baselines on the same features: presets lsh, itq; ablation: unisource.
  python -m rshash_jax.main --config=configs/mrhash.py:local,itq --workdir=/tmp/itq
  # The paper's end-to-end training (backbone at 0.01 x the learning rate; an accelerator job):
  python -m rshash_jax.main --config=configs/mrhash.py:local,finetune --workdir=/tmp/mrhash_ft
  # Partial fine-tuning, as DHCNN's (rshash_jax/training/train_dhcnn.py): the layers below
  # blocks_15 run once per image and view into an activation cache on CPU; blocks_15, the
  # head and the hash network train:
  python -m rshash_jax.main --config=configs/mrhash.py:local,finetune --workdir=/tmp/mrhash_pft \
      --config.train.finetune_from=blocks_15

Presets (comma-separated): local, tiny, best, unisource, lsh, itq, finetune, bits=N.
  best: mrhash.pair_weight = 3 (the codes' inner products follow the pseudo multi-labels'
      similarity, mrhash.pair_term), chosen on the validation split (below); the paper's
      objective stays the default.

Departures from the official code, each a config choice (the sound one is the default):
  mrhash.kl_reduction = "batchmean" (KL per sample, the definition; default) or "mean"
      (the official code's average over batch*16 elements, 16x smaller).
  Checkpoint selection: the official code picks the AE checkpoint by test-set mAP; we
      always take the last one (no test labels are ever looked at during training).
  train.mode = "frozen" (default: backbone features cached once; CPU-friendly) or
      "finetune" (the paper: the backbone trains at train.backbone_lr_mult = 0.01 x the
      rate, 1e-5 vs 1e-3; augmentation is flips / 90-degree rotations, not random crops).
      With train.finetune_from=P only P and the layers above it train (train.finetune_cache,
      train.cached_views as for DHCNN); not measured on UC Merced yet.
Settings of ours:
  model.head_hidden = 1024: with a frozen backbone one trainable ReLU layer in front of the
      hash layer stands in for the paper's trainable fc6/fc7 (0: the hash layer alone).
  mrhash.num_clusters = 64 (the paper: 16 for EuroSAT's 10 classes; UC Merced has 21).
  mrhash.feature_norm = "none" (raw features, as the paper) or "l2" (rows to unit norm);
      then every source is divided by its training-set RMS. LSH and ITQ get the same features.

Undeclared until now, kept as they are (the numbers below were measured with them):
  k-means: scipy's kmeans2 with its default 10 Lloyd iterations per restart (best of
      mrhash.kmeans_n_init = 20 restarts by inertia), not run to convergence. Archives
      whose latents pass 256 MiB (N > 524,288; mrhash.kmeans=auto) get the same 10
      iterations per restart chunked over a memory-mapped file (k-means++ on a 65,536-row
      sample; rshash_jax/models/kmeans.py); the stage-2 targets and codes are computed in
      slices of 65,536 rows, so no device holds the archive's features.
  Epochs use full batches only: the remainder is dropped, in a new order every epoch
      (UC Merced 80%: 144 of 1680 rows per stage-1 epoch at ae_batch_size 512, 16 per
      stage-2 epoch at batch 128).
  Images are resized straight to the backbone's input size (antialiased bicubic), not
      resized and centre-cropped.
  Backbone: EfficientNet-Lite0 (ImageNet, ships with the `weights` extra) instead of the
      paper's AlexNet and ResNet-50.
  "The paper's settings" below (16 clusters, hidden 0) is a linear hash layer on frozen
      features, not the paper's trainable fc6/fc7 (that is :finetune).

How these settings were chosen, honestly: the clusters were first compared on the test
split (commit b47d713 reported 16/32/64/128 clusters on test queries); the validation
table below came afterwards and agrees with that choice, but it is not a selection made
blind to the test split, and at 32 bits the default only ties ITQ on validation (mAP@100
0.6328 vs 0.6340). Validation split: the 80% training part split again 75/25 per class:
1260 database / 420 queries; --validation=0.25 of benchmarks/mrhash_ucmerced.py, seeds 0
and 1, multisource; mAP@100 / mAP, 32 | 64 bits:
  hidden 1024, l2, clusters 16:  0.5784/0.5284 | 0.5967/0.5563
  hidden 1024, l2, clusters 32:  0.6190/0.5531 | 0.6427/0.5824
  hidden 1024, l2, clusters 64:  0.6222/0.5513 | 0.6628/0.5939
  hidden 0,    l2, clusters 32:  0.5945/0.5386 | 0.6441/0.5897
  hidden 1024, none, clusters 32: 0.6175/0.5617 | 0.6573/0.6017
  hidden 1024, none, clusters 64: 0.6328/0.5664 | 0.6644/0.6012   (the defaults)
  ITQ (raw features):            0.6340/0.5370 | 0.6458/0.5445

The objective options, chosen blind to the test split (issue 13): the grid was declared in
benchmarks/mrhash_ucmerced.py (OBJECTIVES, with the selection rule) before any of its runs;
each entry ran on the validation split above with seeds 0, 1, 2 at 32 and 64 bits, on the
defaults otherwise; mAP@100 / mAP, mean over seeds (std of mAP@100), 32 | 64 bits:
  paper (the default)               0.6153/0.5434 (0.0067) | 0.6659/0.5970 (0.0091)
  pair_weight 0.3                   0.6266/0.5469 (0.0170) | 0.6769/0.6128 (0.0042)
  pair_weight 1                     0.6475/0.5730 (0.0164) | 0.6844/0.6211 (0.0092)
  pair_weight 3                     0.6636/0.5977 (0.0168) | 0.6990/0.6343 (0.0114)  selected
  quant 0.1, balance 0.1            0.6262/0.5594 (0.0135) | 0.6819/0.6135 (0.0098)
  pair 1, quant 0.1, balance 0.1    0.6570/0.5840 (0.0068) | 0.7026/0.6329 (0.0050)
  ITQ                               0.6261/0.5334 (0.0039) | 0.6442/0.5433 (0.0021)
Rule: the best mAP@100 averaged over both lengths: pair_weight 3 (0.6813) over pair 1 +
quant + balance (0.6798); it is the `best` preset. It leads ITQ on validation by 0.038 and
0.055, more than its seed std at both lengths. pair_weight 3 is the grid's largest: larger
weights were not declared and are not tried. With the current code (images resized by
TensorFlow) the paper's objective is below ITQ at 32 bits on validation.
    python benchmarks/mrhash_ucmerced.py --validation=0.25 --objective=NAME \
        --methods=MrHash-multisource

Measured here (2-core CPU, ../shared/data/ucmerced 80/20, coarse4 view + full image,
test split read once after the selection above, mean +- std over seeds 0, 1, 2; mAP@100 /
mAP; `python benchmarks/mrhash_ucmerced.py --objective=pair3`, and `--objective=paper
--methods=MrHash-multisource` for the default's row):
  32 bits: LSH 0.3861/0.2412, ITQ 0.6498/0.5369, MrHash-multisource (default) 0.6609/0.5808,
           best: MrHash-unisource 0.6645/0.5682, MrHash-multisource 0.6956 +- 0.0110/0.6229
  64 bits: LSH 0.4943/0.3258, ITQ 0.6825/0.5532, MrHash-multisource (default) 0.7046/0.6303,
           best: MrHash-unisource 0.7053/0.6050, MrHash-multisource 0.7288 +- 0.0137/0.6683
  `best` leads ITQ by 0.046 mAP@100 at both lengths, more than its seed std (the default's
  lead at 32 bits, 0.011, is under its std of 0.016). 73-82 s of training per MrHash run.
  With the paper's settings (16 clusters, no hidden layer) MrHash-multisource was below
  ITQ: 0.5818/0.5324 at 32 bits (seed 0, before images were resized by TensorFlow).
  Fine-tuning (:local,finetune) here: ~6.5 s per step of 32 images (2652 steps, ~4.8 h);
  the paper's batch of 128 did not fit this 23 GB machine.
  configs/mrhash.py:tiny: ~30 s on generated scenes.
"""

import ml_collections

from rshash_jax import config_defaults


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.method = "mrhash"
  c.seed = 0

  c.data = config_defaults.data()

  c.model = config_defaults.model()
  c.model.head_hidden = 1024  # frozen backbone: one trainable layer stands in for fc6/fc7

  c.mrhash = ml_collections.ConfigDict()
  c.mrhash.image_view = "coarse4"  # what the hash network sees (train and test)
  c.mrhash.sources = (
    "coarse4",
    "full",
  )  # source 1 (AE input) first; views: full, coarseN, folder:DIR,
  # each optionally ;bands=...;scale=... (multisource.py)
  c.mrhash.release_sources = ("msi", "vhr")  # release format: feature-file source names
  c.mrhash.num_clusters = 64  # paper: 16 (EuroSAT, 10 classes); see the docstring
  c.mrhash.kmeans_n_init = 20
  # auto: scipy in memory while the latents fit 256 MiB (N <= 524,288), else chunked Lloyd
  # over a memory-mapped file (rshash_jax/models/kmeans.py); exact | streamed force one.
  c.mrhash.kmeans = "auto"
  c.mrhash.ae_epochs = 200
  c.mrhash.ae_batch_size = 512
  c.mrhash.ae_lr = 1e-3
  c.mrhash.ae_lr_halve_epochs = 40
  c.mrhash.recon_weight = 5.0
  c.mrhash.kl_reduction = "batchmean"  # batchmean (sound) | mean (official)
  c.mrhash.pair_weight = 0.0  # options of ours, 0 = the paper's objective (mrhash.stage2_loss):
  c.mrhash.quant_weight = 0.0  #   pairwise pseudo-label similarity, quantisation,
  c.mrhash.balance_weight = 0.0  #   bit balance of the codes h
  c.mrhash.baseline = ""  # "" (MrHash) | lsh | itq
  c.mrhash.hash_init = "random"  # random (paper) | itq: hash layer starts at ITQ
  c.mrhash.feature_norm = "none"  # none (paper: raw features) | l2 (rows to unit norm)

  c.train = config_defaults.train()  # stage 2
  c.train.epochs = 51
  c.train.batch_size = 128
  c.train.optimizer = "adam"
  c.train.schedule = "step"  # lr x 0.7 every 10 epochs
  c.train.lr_start = 1e-3
  c.train.lr_decay = 0.7
  c.train.lr_decay_epochs = 10
  c.train.weight_decay = 0.0
  c.train.mode = "frozen"  # frozen (cached features) | finetune (the paper)
  c.train.backbone_lr_mult = 0.01  # finetune: backbone at 1e-5 = 0.01 x 1e-3, as the paper
  c.train.log_every_steps = 50
  c.train.checkpoint_every_steps = 500

  c.features = config_defaults.features()

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 64
  c.eval.reference = "backbone"  # neighbour recall's reference: the frozen backbone | none
  c.eval.map_at_r = 100  # 1900 for EuroSAT (paper), 9375 for DSRSID
  c.eval.map_ks = (100,)
  c.eval.ks = config_defaults.DHCNN_KS

  config_defaults.apply_presets(c, arg, PRESETS, KEYED)
  return c


def _local(c):
  c.data.source = "auto"


def _best(c):
  c.mrhash.pair_weight = 3.0  # chosen on validation (docstring, benchmarks/mrhash_ucmerced.py)


def _unisource(c):
  c.mrhash.sources = (c.mrhash.image_view, c.mrhash.image_view)


def _baseline(name):
  def apply(c):
    c.mrhash.baseline = name

  return apply


def _finetune(c):
  c.train.mode = "finetune"
  c.data.augment = True


def _tiny(c):
  c.data.source = "generated"
  c.data.generated_size = 32
  c.data.generated_per_class = 10
  c.model.backbone = "tiny_cnn"
  c.model.pretrained = False
  c.model.bits = 16
  c.model.head_hidden = 32
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


PRESETS = {
  "local": _local,
  "tiny": _tiny,
  "best": _best,
  "unisource": _unisource,
  "lsh": _baseline("lsh"),
  "itq": _baseline("itq"),
  "finetune": _finetune,
}
KEYED = {"bits": lambda c, v: setattr(c.model, "bits", int(v))}
