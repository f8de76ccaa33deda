"""MrHash vs ITQ vs LSH on UC Merced with a simulated second source.

    python benchmarks/mrhash_ucmerced.py --data=../shared/data/ucmerced --workdir=/tmp/mrhash_bench

No paired multisource UC Merced exists, so it is simulated: source 2 is the full-resolution
image, source 1 a 4x coarser view of the same scene (box-averaged, as a lower-resolution
sensor would see it), and the hash network sees only the coarse view, at training and test
time. MrHash-unisource (source 2 = source 1) is the ablation. All methods hash the same
cached EfficientNet-Lite0 features of the coarse view; none sees a label in training.
Seeded 80/20 per-class split, database = train, queries = test. Prints mAP@R and full mAP
at each code length, and the runtime of each method (feature extraction is done once and
reported separately).

To choose settings without the test queries, --validation=0.25 splits the training part
again (1260 database / 420 queries) and evaluates there, e.g.
    python benchmarks/mrhash_ucmerced.py --validation=0.25 --methods=MrHash-multisource \
        --clusters=16

The objective options (issue 13), declared here before any of their runs: --objective
names one of OBJECTIVES (mrhash.stage2_loss's weights; MrHash methods only). Protocol:
every entry on validation, seeds 0, 1, 2, 32 and 64 bits, beside ITQ on the same split:
    python benchmarks/mrhash_ucmerced.py --validation=0.25 --objective=NAME \
        --methods=MrHash-multisource[,ITQ]
The entry with the highest validation mAP@100, averaged over both code lengths and the
seeds, becomes configs/mrhash.py's `best` preset (ties: the simpler, fewer terms); only
then is the test split read, once, for it, ITQ, LSH and its unisource ablation:
    python benchmarks/mrhash_ucmerced.py --objective=NAME
"""

import argparse
import os
import shutil
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs"))

import numpy as np  # noqa: E402
from absl import logging  # noqa: E402

import mrhash as mrhash_config  # noqa: E402  (configs/mrhash.py)
from rshash_jax.data import input_pipeline  # noqa: E402
from rshash_jax.training import train_mrhash  # noqa: E402

OBJECTIVES = {
  "paper": {},  # KL + KL + reconstruction, as the paper
  "pair0.3": {"pair_weight": 0.3},
  "pair1": {"pair_weight": 1.0},
  "pair3": {"pair_weight": 3.0},
  "quant_balance": {"quant_weight": 0.1, "balance_weight": 0.1},
  "pair1_quant_balance": {"pair_weight": 1.0, "quant_weight": 0.1, "balance_weight": 0.1},
}
METHODS = (
  ("LSH", "lsh"),
  ("ITQ", "itq"),
  ("MrHash-unisource", "unisource"),
  ("MrHash-multisource", ""),
)


def main():
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--data", default="../shared/data/ucmerced")
  p.add_argument("--workdir", default="/tmp/mrhash_ucmerced")
  p.add_argument("--bits", default="32,64")
  p.add_argument("--r", type=int, default=100, help="R of mAP@R")
  p.add_argument("--coarse", type=int, default=4, help="source-1 coarsening factor")
  p.add_argument(
    "--clusters", type=int, default=0, help="MrHash k-means centres (0: the config's; paper: 16)"
  )
  p.add_argument("--feature-norm", default="", choices=("", "l2", "none"), help="'': the config's")
  p.add_argument(
    "--hidden", type=int, default=-1, help="MrHash hidden layer width (-1: the config's; 0: none)"
  )
  p.add_argument(
    "--seeds", default="0,1,2", help="model seeds (init, k-means, LSH/ITQ); the split is fixed"
  )
  p.add_argument(
    "--methods",
    default=",".join(m for m, _ in METHODS),
    help="subset of " + ", ".join(m for m, _ in METHODS),
  )
  p.add_argument(
    "--objective",
    default="paper",
    choices=tuple(OBJECTIVES),
    help="MrHash objective options (OBJECTIVES; declared before their runs)",
  )
  p.add_argument(
    "--validation",
    type=float,
    default=0.0,
    help="> 0: evaluate on this share of the training part (for choosing settings; test unused)",
  )
  args = p.parse_args()
  logging.set_verbosity(logging.WARNING)
  input_pipeline.configure_tf()
  cache = os.path.join(args.workdir, "cache")
  seeds = [int(s) for s in args.seeds.split(",")]
  runs = {}
  t_all = time.perf_counter()
  for bits in (int(b) for b in args.bits.split(",")):
    for label, preset in METHODS:
      if label not in args.methods.split(","):
        continue
      for seed in seeds:
        c = mrhash_config.get_config(",".join(filter(None, (preset, f"bits={bits}"))))
        c.data.source = f"folder:{args.data}"
        c.mrhash.image_view = f"coarse{args.coarse}"
        c.mrhash.sources = (
          (c.mrhash.image_view,) * 2 if preset == "unisource" else (c.mrhash.image_view, "full")
        )
        c.mrhash.num_clusters = args.clusters or c.mrhash.num_clusters
        c.mrhash.feature_norm = args.feature_norm or c.mrhash.feature_norm
        c.model.head_hidden = args.hidden if args.hidden >= 0 else c.model.head_hidden
        if preset not in ("lsh", "itq"):
          for key, value in OBJECTIVES[args.objective].items():
            c.mrhash[key] = value
        c.data.validation = args.validation
        c.features.cache_dir = cache
        c.eval.map_at_r = args.r
        c.seed = seed
        workdir = os.path.join(
          args.workdir, f"{preset or 'mrhash'}_{args.objective}_{bits}_seed{seed}"
        )
        shutil.rmtree(workdir, ignore_errors=True)  # never resume a run made with other settings
        res = train_mrhash.train_and_evaluate(c, workdir)
        runs.setdefault((label, bits), []).append(
          (res["map_at_r"], res["map"], res["train_seconds"])
        )
        print(
          f"{label:20s} {bits:3d} bits seed {seed}  mAP@{args.r}={res['map_at_r']:.4f}  "
          f"mAP={res['map']:.4f}  "
          f"train {res['train_seconds']:.1f}s",
          flush=True,
        )
  print(
    f"\ntotal wall time {time.perf_counter() - t_all:.0f}s (includes one-off feature extraction)"
  )
  print(
    f"mean +- std over seeds {args.seeds}; {c.mrhash.num_clusters} clusters, hidden "
    f"{c.model.head_hidden}, "
    f"feature_norm={c.mrhash.feature_norm}, objective {args.objective} "
    f"{OBJECTIVES[args.objective]}, "
    "evaluated on the "
    f"{'validation part of the training split' if args.validation else 'test split'}"
  )
  print(f"| method | bits | mAP@{args.r} | mAP | train s |")
  print("|---|---|---|---|---|")
  for (label, bits), v in runs.items():
    a = np.asarray(v)
    print(
      f"| {label} | {bits} | {a[:, 0].mean():.4f} +- {a[:, 0].std():.4f} | {a[:, 1].mean():.4f} +- "
      f"{a[:, 1].std():.4f} | {a[:, 2].mean():.1f} |"
    )


if __name__ == "__main__":
  main()
