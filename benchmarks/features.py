"""Backbone features of a class-folder dataset, scored by 1-nearest-neighbour accuracy.

    python benchmarks/features.py --backbone=efficientnet_lite0 --data=../shared/data/ucmerced
    python benchmarks/features.py --backbone=efficientnet_lite0 --data=../shared/data/ucmerced --random_init

Seeded 80/20 per-class split; each test image takes the label of its nearest training
image (cosine similarity of the features). Prints images/s of feature extraction
(decode + resize + CNN, all cores) and, as its last line, `accuracy=0.xxxx`.
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import logging  # noqa: E402

from rshash_jax import backbones, datasets, features, input_pipeline, sharding  # noqa: E402


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--backbone", default="efficientnet_lite0", choices=backbones.NAMES)
  p.add_argument("--data", required=True, help="class-folder dataset root")
  p.add_argument("--weights_path", default=None, help="local weights file (vgg_f, alexnet need one)")
  p.add_argument("--random_init", action="store_true", help="random initialisation instead of ImageNet weights")
  p.add_argument("--image_size", type=int, default=None)
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--train_ratio", type=float, default=0.8)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args()
  logging.set_verbosity(logging.INFO)
  input_pipeline.configure_tf()

  table = datasets.class_folder(args.data)
  bb = backbones.create(args.backbone, pretrained=not args.random_init, weights_path=args.weights_path,
                        image_size=args.image_size, seed=args.seed)
  mesh = sharding.data_mesh()
  # Warm-up batch so the timing below excludes compilation.
  encoder = features.make_encoder(bb, mesh)
  n = -(-args.batch_size // mesh.devices.size) * mesh.devices.size
  encoder(bb.variables, np.zeros((n, bb.image_size, bb.image_size, 3), np.uint8)).block_until_ready()
  t = time.perf_counter()
  feats = features.extract(bb, table, mesh, batch_size=args.batch_size, encoder=encoder)
  dt = time.perf_counter() - t
  train, test = datasets.split_per_class(table.labels, args.train_ratio, args.seed)
  f = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
  nearest = np.argmax(f[test] @ f[train].T, axis=1)
  acc = float(np.mean(table.labels[train][nearest] == table.labels[test]))
  print(f"backbone={bb.name} pretrained={bb.pretrained} images={len(table)} size={bb.image_size} "
        f"devices={jax.device_count()} extract_s={dt:.1f} images_per_s={len(table) / dt:.1f}")
  print(f"train={len(train)} test={len(test)} 1-NN cosine")
  print(f"accuracy={acc:.4f}")


if __name__ == "__main__":
  main()
