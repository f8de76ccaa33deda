"""DHCNN codes that rank by similarity: a grid selected on validation by a declared rule.

    python benchmarks/dhcnn_neighbours.py --data=../shared/data/ucmerced \
        --workdir=/tmp/dhcnn_neighbours
    python benchmarks/dhcnn_neighbours.py --test ...   # afterwards: the test split, chosen
                                                       # setting and the two baselines only

Declared before any of its runs (issue 29, items 2 and 3). The values of the margin grid
were narrowed by single validation runs of seed 0 at 64 bits made while the options were
written (centre margins 0.1-0.25, distillation weights 0.1-3, centre weights 1-300); no
test split was read for them.

Grid, on `configs/dhcnn.py:local` (frozen EfficientNet-Lite0 features, Adam, 100 epochs):
  baseline   dhcnn.center_weight 0                                  (the `local` preset)
  centers    dhcnn.center_weight 1                                  (the `local,centers` preset)
  margin     dhcnn.center_weight 100, dhcnn.center_margin 0.15 | 0.2,
             dhcnn.distill_weight 0.5 | 1 | 2
  model.bits 32 | 64; seed = data.seed = 0 | 1 | 2 (initialisation, split and held-out
  classes all change with the seed).
Every run: data.validation = 0.25 (the training part split again; the test images are not
read) and data.unseen_classes = 0.25 (5 of UC Merced's 21 classes held out of training and
ranked among themselves).

Rule: for each setting, score = mean over both lengths and the three seeds of
(map_tie_aware + neighbour_recall_at[10] + unseen_map_tie_aware) / 3; the setting with the
highest score is chosen (ties: the earlier in the grid). Each measure's mean +- std goes in
the record beside the same runs' ITQ and float-feature references.

The record (--record, default benchmarks/results/dhcnn_neighbours_selection.json) holds the
command, commit, date, host, versions, the grid, the rule, every run's measures and the
choice; --test appends the test-split rows of the chosen setting and the two baselines.
"""

import argparse
import datetime
import itertools
import json
import os
import platform
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs"))

import jax  # noqa: E402
from absl import logging  # noqa: E402

import dhcnn as dhcnn_config  # noqa: E402  (configs/dhcnn.py)
from rshash_jax.data import input_pipeline  # noqa: E402
from rshash_jax.training import train_dhcnn  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = [("baseline", 0.0, 0.0, 0.0), ("centers", 1.0, 0.0, 0.0)] + [
  (f"margin{m:g}_distill{d:g}", 100.0, m, d)
  for m, d in itertools.product((0.15, 0.2), (0.5, 1.0, 2.0))
]
BITS = (32, 64)
SEEDS = (0, 1, 2)
MEASURES = (
  "map",
  "map_tie_aware",
  "neighbour_recall_at10",
  "unseen_map_tie_aware",
  "distinct_fraction",
)
REFERENCES = ("itq_map", "itq_neighbour_recall_at10", "unseen_map_itq", "unseen_map_float")


def run(args, split, setting, bits, seed, unseen=0.25):
  name, center_weight, margin, distill = setting
  c = dhcnn_config.get_config("local")
  c.data.source = f"folder:{args.data}"
  c.data.validation = 0.25 if split == "validation" else 0.0
  c.data.unseen_classes = unseen
  c.seed = c.data.seed = seed
  c.model.bits = bits
  c.dhcnn.center_weight, c.dhcnn.center_margin, c.dhcnn.distill_weight = (
    center_weight,
    margin,
    distill,
  )
  c.features.cache_dir = os.path.join(args.workdir, "cache")
  c.train.checkpoint_every_steps = 10**9
  wd = os.path.join(args.workdir, f"{split}_{name}_{bits}_s{seed}_u{unseen:g}")
  path = os.path.join(wd, "results.json")
  if not os.path.isfile(path):  # a finished run is read back: the benchmark resumes
    train_dhcnn.train_and_evaluate(c, wd)
  with open(path) as f:
    r = json.load(f)
  row = dict(
    split=split,
    setting=name,
    bits=bits,
    seed=seed,
    unseen_classes=unseen,
    map=r["map"],
    map_tie_aware=r["map_tie_aware"],
    accuracy=r["accuracy"],
    neighbour_recall_at10=r["neighbour_recall_at"]["10"],
    neighbour_recall_at100=r["neighbour_recall_at"].get("100"),
    distinct_codes=r["distinct_codes"],
    distinct_fraction=r["distinct_fraction"],
    bit_entropy=r["bit_entropy"],
    itq_map=r["reference_itq"]["map"],
    itq_neighbour_recall_at10=r["reference_itq"]["neighbour_recall_at"]["10"],
    train_seconds=r["timing"]["train_seconds"],
  )
  for k in ("unseen_map", "unseen_map_tie_aware", "unseen_map_itq", "unseen_map_float"):
    row[k] = r.get(k)
  print(
    "{split:10s} {setting:22s} {bits:3d} s{seed}  mAP {map:.4f} tie {map_tie_aware:.4f}  "
    "NR@10 {neighbour_recall_at10:.4f} (ITQ {itq_neighbour_recall_at10:.4f})  distinct "
    "{distinct_fraction:.3f}".format(**row)
    + (
      "  unseen {unseen_map_tie_aware:.4f} (ITQ {unseen_map_itq:.4f}, float "
      "{unseen_map_float:.4f})".format(**row)
      if row["unseen_map"] is not None
      else ""
    ),
    flush=True,
  )
  return row


def _mean_std(rows, key):
  import numpy as np  # pylint: disable=g-import-not-at-top

  v = np.array([r[key] for r in rows], np.float64)
  return {"mean": float(v.mean()), "std": float(v.std())}


def summarise(rows):
  out = {}
  for name, *_ in SETTINGS:
    mine = [r for r in rows if r["setting"] == name]
    if not mine:
      continue
    score = [
      (r["map_tie_aware"] + r["neighbour_recall_at10"] + r["unseen_map_tie_aware"]) / 3
      for r in mine
    ]
    out[name] = {"score": sum(score) / len(score), "runs": len(mine)}
    for bits in BITS:
      per = [r for r in mine if r["bits"] == bits]
      out[name][str(bits)] = {k: _mean_std(per, k) for k in MEASURES + REFERENCES}
  return out


def _host():
  cpu = ""
  if os.path.isfile("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  return {
    "cpu": cpu,
    "cores": os.cpu_count(),
    "machine": platform.machine(),
    "devices": str(jax.devices()),
  }


def main():
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--data", default="../shared/data/ucmerced")
  p.add_argument("--workdir", default="/tmp/dhcnn_neighbours")
  p.add_argument(
    "--record",
    default=os.path.join(REPO, "benchmarks", "results", "dhcnn_neighbours_selection.json"),
  )
  p.add_argument("--test", action="store_true", help="after the selection: the test split")
  args = p.parse_args()
  logging.set_verbosity(logging.WARNING)
  input_pipeline.configure_tf()
  if args.test:
    with open(args.record) as f:
      record = json.load(f)
    chosen = record["chosen"]
    test_settings = [s for s in SETTINGS if s[0] in ("baseline", "centers", chosen)]
    rows = []
    for setting, bits in itertools.product(test_settings, BITS):
      rows.append(run(args, "test", setting, bits, 0, unseen=0.0))
      rows.append(run(args, "test", setting, bits, 0, unseen=0.25))
    record["test"] = {"command": " ".join(sys.argv), "rows": rows}
  else:
    rows = [
      run(args, "validation", s, b, seed) for s, b, seed in itertools.product(SETTINGS, BITS, SEEDS)
    ]
    summary = summarise(rows)
    chosen = max((s[0] for s in SETTINGS), key=lambda n: summary[n]["score"])  # first of equals
    commit = subprocess.run(
      ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    import flax  # pylint: disable=g-import-not-at-top

    record = {
      "command": "python benchmarks/dhcnn_neighbours.py " + " ".join(sys.argv[1:]),
      "commit": commit,
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "host": _host(),
      "versions": {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": flax.__version__,
      },
      "grid": {
        "settings": SETTINGS,
        "bits": BITS,
        "seeds": SEEDS,
        "validation": 0.25,
        "unseen_classes": 0.25,
      },
      "rule": "max over settings of mean over bits and seeds of "
      "(map_tie_aware + neighbour_recall_at[10] + unseen_map_tie_aware) / 3",
      "summary": summary,
      "chosen": chosen,
      "runs": rows,
    }
    print(f"# chosen on validation: {chosen} (score {summary[chosen]['score']:.4f})", flush=True)
  os.makedirs(os.path.dirname(args.record), exist_ok=True)
  tmp = args.record + ".tmp"
  with open(tmp, "w") as f:
    json.dump(record, f, indent=1)
  os.replace(tmp, args.record)


if __name__ == "__main__":
  main()
