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
"""

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs"))

from absl import logging  # noqa: E402

import mrhash as mrhash_config  # noqa: E402  (configs/mrhash.py)
from rshash_jax import input_pipeline, train_mrhash  # noqa: E402

METHODS = (("LSH", "lsh"), ("ITQ", "itq"), ("MrHash-unisource", "unisource"), ("MrHash-multisource", ""))


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data", default="../shared/data/ucmerced")
  p.add_argument("--workdir", default="/tmp/mrhash_ucmerced")
  p.add_argument("--bits", default="32,64")
  p.add_argument("--r", type=int, default=100, help="R of mAP@R")
  p.add_argument("--coarse", type=int, default=4, help="source-1 coarsening factor")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args()
  logging.set_verbosity(logging.WARNING)
  input_pipeline.configure_tf()
  cache = os.path.join(args.workdir, "cache")
  rows = []
  t_feat = time.perf_counter()
  for bits in (int(b) for b in args.bits.split(",")):
    for label, preset in METHODS:
      c = mrhash_config.get_config(",".join(filter(None, (preset, f"bits={bits}"))))
      c.data.source = f"folder:{args.data}"
      c.mrhash.image_view = f"coarse{args.coarse}"
      c.mrhash.sources = ((c.mrhash.image_view,) * 2 if preset == "unisource"
                          else (c.mrhash.image_view, "full"))
      c.features.cache_dir = cache
      c.eval.map_at_r = args.r
      c.seed = args.seed
      workdir = os.path.join(args.workdir, f"{preset or 'mrhash'}_{bits}")
      t = time.perf_counter()
      res = train_mrhash.train_and_evaluate(c, workdir)
      rows.append((label, bits, res["map_at_r"], res["map"], res["train_seconds"], time.perf_counter() - t))
      print(f"{label:20s} {bits:3d} bits  mAP@{args.r}={res['map_at_r']:.4f}  mAP={res['map']:.4f}  "
            f"train {res['train_seconds']:.1f}s", flush=True)
  print(f"\ntotal wall time {time.perf_counter() - t_feat:.0f}s (includes one-off feature extraction)")
  print(f"| method | bits | mAP@{args.r} | mAP | train s |")
  print("|---|---|---|---|---|")
  for label, bits, mr, m, ts, _ in rows:
    print(f"| {label} | {bits} | {mr:.4f} | {m:.4f} | {ts:.1f} |")


if __name__ == "__main__":
  main()
