"""DHCNN options chosen on a validation split, then every option reported on the test split.

    python benchmarks/dhcnn_options.py --data=../shared/data/ucmerced --workdir=/tmp/dhcnn_options
    python benchmarks/dhcnn_options.py --grid=partial --data=../shared/data/ucmerced \
        --workdir=/tmp/dhcnn_options

Each grid is declared here before any of its numbers was looked at, and is not changed after.

--grid=frozen (the first):
  model.backbone      efficientnet_lite0 | efficientnet_lite1 | efficientnet_lite2
  dhcnn.center_weight 0 (the paper) | 0.1 | 1   (class-wise hash targets, models/dhcnn.py)
  model.bits          32 | 64                   (each length chosen on its own)
every point on `configs/dhcnn.py:local` otherwise (frozen features, Adam, 100 epochs).

--grid=partial (declared after the frozen grid's validation rows, which chose
center_weight 1 at both lengths and efficientnet_lite0 at 32 bits):
  train.finetune_from ""  (frozen) | head | blocks_15   (efficientnet_lite0)
  model.bits          32 | 64
on `configs/dhcnn.py:local,centers` plus, for the fine-tuned points, the `partial` preset
(cached activations of 4 dihedral views, backbone at 0.1x the learning rate, the `local`
schedule: 100 epochs of batch 10). A first declaration with 20 epochs of batch 32 was
stopped after its first row (32 bits, head: validation mAP 0.9445 against 0.9682 frozen):
it gave the hash head 20x fewer updates than the frozen runs it was compared with.
blocks_11 was declared too and dropped before any of its runs finished: at ~50 ms per
step for blocks_15 on this 2-core CPU, blocks_11 would not fit a 15-minute preset.

1. Validation: data.validation=0.25 splits the 80% training part again (UC Merced: 1260
   database / 420 queries); the test images are not read. At each length the setting
   with the best validation mAP is selected (ties go to the earlier grid point).
2. Test: every grid point is then run on the 80/20 split (database = the whole training
   part, queries = the test part), so the table shows what each option does, with the
   selected rows marked. Selection never looks at these numbers.

--grid=modes (issue 13, item 1: what partial fine-tuning costs and gives, not a choice):
frozen | partial (blocks_15, the `best` preset) | full fine-tuning (every layer trains, the
frozen layers' activations are not cached), `local,centers` otherwise, 64 bits, all at the
same --epochs (required: 100 epochs of full fine-tuning take ~4 h on this CPU), on the
test split only; the data/cache, training and evaluation seconds are printed apart:
    python benchmarks/dhcnn_options.py --grid=modes --epochs=3 --data=../shared/data/ucmerced \
        --workdir=/tmp/dhcnn_modes

Prints one row per run (split, bits, backbone, center weight, mAP, accuracy, gap =
accuracy - mAP, seconds of features + training + evaluation) and, at the end, the selected
setting of each length. Feature extraction is done once per backbone (a shared cache), and
its seconds are printed apart.
"""

import argparse
import itertools
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs"))

from absl import logging  # noqa: E402

import dhcnn as dhcnn_config  # noqa: E402  (configs/dhcnn.py)
from rshash_jax.data import input_pipeline  # noqa: E402
from rshash_jax.training import train_dhcnn  # noqa: E402

BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
CENTER_WEIGHTS = (0.0, 0.1, 1.0)
BITS = (32, 64)
POINTS = ("", "head", "blocks_15")


def run(args, split: str, bits: int, backbone: str, center_weight: float, point: str = ""):
  c = dhcnn_config.get_config("local" + (",partial" if point else ""))
  # The grid was declared on `local` with Adam 1e-3, its optimiser until --grid=local of
  # benchmarks/dhcnn_neighbours.py chose 3e-4: the base stays what the record ran.
  c.train.lr_start = 1e-3
  full = point == "full"  # every layer trains: no split point, nothing cached
  point = "" if full else point
  c.data.source = f"folder:{args.data}"
  c.data.validation = 0.25 if split == "validation" else 0.0
  c.model.bits, c.model.backbone = bits, backbone
  c.dhcnn.center_weight = center_weight
  c.train.finetune_from = point
  c.features.cache_dir = os.path.join(args.workdir, "cache")
  c.train.checkpoint_every_steps = 10**9
  if args.epochs:
    c.train.epochs = args.epochs
  name = "full" if full else point
  wd = os.path.join(
    args.workdir, f"{split}_{bits}_{backbone}_{center_weight:g}" + (f"_{name}" if name else "")
  )
  path = os.path.join(wd, "results.json")
  if not os.path.isfile(path):  # a finished run is read back: the benchmark resumes
    train_dhcnn.train_and_evaluate(c, wd)
  with open(path) as f:
    r = json.load(f)
  t = r["timing"]
  row = dict(
    split=split,
    bits=bits,
    backbone=backbone,
    center_weight=center_weight,
    point=name or "frozen",
    map=r["map"],
    accuracy=r["accuracy"],
    gap=r["accuracy"] - r["map"],
    seconds=t["data_and_features_seconds"] + t["train_seconds"] + t["eval_seconds"],
    data_seconds=t["data_and_features_seconds"],
    train_seconds=t["train_seconds"],
    eval_seconds=t["eval_seconds"],
  )
  print(
    "{split:10s} {bits:3d} {backbone:18s} {center_weight:4g} {point:9s}  mAP {map:.4f}  acc "
    "{accuracy:.4f}  "
    "gap {gap:+.4f}  {seconds:6.1f} s (data/cache {data_seconds:.1f} s, train {train_seconds:.1f} "
    "s, "
    "eval {eval_seconds:.1f} s)".format(**row),
    flush=True,
  )
  return row


def main():
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--data", default="../shared/data/ucmerced")
  p.add_argument("--workdir", default="/tmp/dhcnn_options")
  p.add_argument("--epochs", type=int, default=0, help="0: the preset's")
  p.add_argument("--skip_test", action="store_true", help="validation and selection only")
  p.add_argument("--grid", default="frozen", choices=("frozen", "partial", "modes"))
  args = p.parse_args()
  if args.grid == "modes":
    if not args.epochs:
      p.error("--grid=modes compares the modes at equal epochs: give --epochs")
    logging.set_verbosity(logging.WARNING)
    input_pipeline.configure_tf()
    for point in ("", "blocks_15", "full"):
      run(args, "test", 64, "efficientnet_lite0", 1.0, point)
    return
  logging.set_verbosity(logging.WARNING)
  input_pipeline.configure_tf()
  if args.grid == "frozen":
    grid = [(bits, b, w, "") for bits, b, w in itertools.product(BITS, BACKBONES, CENTER_WEIGHTS)]
    for b in BACKBONES:  # the one-off feature extraction of each backbone, timed apart
      t = time.perf_counter()
      run(args, "validation", BITS[0], b, CENTER_WEIGHTS[0])
      print(
        f"# {b}: first run incl. feature extraction {time.perf_counter() - t:.1f} s", flush=True
      )
  else:
    grid = [
      (bits, "efficientnet_lite0", 1.0, point) for bits, point in itertools.product(BITS, POINTS)
    ]
  val = [run(args, "validation", *g) for g in grid]
  chosen = {}
  for bits in BITS:
    rows = [r for r in val if r["bits"] == bits]
    best = max(rows, key=lambda r: r["map"])  # max keeps the first of equals
    chosen[bits] = (best["backbone"], best["center_weight"], best["point"])
  print("# selected on validation:", json.dumps({str(k): v for k, v in chosen.items()}), flush=True)
  if args.skip_test:
    return
  for g in grid:
    r = run(args, "test", *g)
    if chosen[r["bits"]] == (r["backbone"], r["center_weight"], r["point"]):
      print("#   ^ selected", flush=True)


if __name__ == "__main__":
  main()
