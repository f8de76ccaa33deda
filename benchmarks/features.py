"""Backbone features of a class-folder dataset, scored by 1-nearest-neighbour accuracy.

    python benchmarks/features.py --backbone=efficientnet_lite0 --data=../shared/data/ucmerced
    python benchmarks/features.py --backbone=efficientnet_lite0 --data=../shared/data/ucmerced \
        --random_init

Seeded 80/20 per-class split; each test image takes the label of its nearest training
image (cosine similarity of the features). Prints images/s of feature extraction over the
whole archive (decode + resize + CNN, all cores, after a compiling warm-up batch): the
median of --passes passes, with their range (one pass varies by up to 1.7x on this shared
host), and, as its last line, `accuracy=0.xxxx`.

Against PyTorch CPU on the same network and batch (`pip install torch==2.13.0` in the
benchmark's environment only; benchmarks/torch_peer.py runs it in a process of its own):

    python benchmarks/features.py --backbone=efficientnet_lite0 --data=../shared/data/ucmerced \
        --batch_size=32 --torch
    python benchmarks/features.py --backbone=vgg_f --random_init --data=../shared/data/ucmerced \
        --batch_size=32 --torch

Each of `--pairs` pairs times ours on `--peer_images` images of the dataset (decoded and
resized by tf.data, overlapped with the network) and then PyTorch's forward pass (no_grad,
eval) on as many images already decoded, normalised and in memory, in its fastest
configuration (eager or torch.compile'd, NCHW or channels_last: each measured first, all
recorded). The ratio is our images/s over PyTorch's; the
line before the accuracy gives the median of the pairs and their range. Also printed: our
network alone on an in-memory batch, as PyTorch is timed.
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import _record  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import logging  # noqa: E402

from rshash_jax.data import datasets, features, input_pipeline  # noqa: E402
from rshash_jax.models import backbones  # noqa: E402
from rshash_jax.parallel import sharding  # noqa: E402


def main():
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--backbone", default="efficientnet_lite0", choices=backbones.NAMES)
  p.add_argument("--data", required=True, help="class-folder dataset root")
  p.add_argument(
    "--weights_path", default=None, help="local weights file (vgg_f, alexnet need one)"
  )
  p.add_argument(
    "--random_init", action="store_true", help="random initialisation instead of ImageNet weights"
  )
  p.add_argument("--image_size", type=int, default=None)
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--train_ratio", type=float, default=0.8)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument(
    "--torch", action="store_true", help="time PyTorch CPU beside us (benchmarks/torch_peer.py)"
  )
  p.add_argument("--pairs", type=int, default=5, help="with --torch: interleaved pairs")
  p.add_argument(
    "--peer_images", type=int, default=320, help="with --torch: images per side and pair"
  )
  p.add_argument(
    "--passes", type=int, default=3, help="timed extraction passes over the archive (median)"
  )
  p.add_argument("--record", default=None, help="write a JSON record here (benchmarks/_record.py)")
  args = p.parse_args()
  if args.passes < 1:
    p.error(f"--passes must be >= 1, got {args.passes}")
  logging.set_verbosity(logging.INFO)
  input_pipeline.configure_tf()

  table = datasets.class_folder(args.data)
  bb = backbones.create(
    args.backbone,
    pretrained=not args.random_init,
    weights_path=args.weights_path,
    image_size=args.image_size,
    seed=args.seed,
  )
  mesh = sharding.data_mesh()
  # Warm-up batch so the timing below excludes compilation.
  encoder = features.make_encoder(bb, mesh)
  n = -(-args.batch_size // mesh.devices.size) * mesh.devices.size
  encoder(
    bb.variables, np.zeros((n, bb.image_size, bb.image_size, 3), np.uint8)
  ).block_until_ready()
  seconds = []
  for _ in range(args.passes):
    t = time.perf_counter()
    feats = features.extract(bb, table, mesh, batch_size=args.batch_size, encoder=encoder)
    seconds.append(time.perf_counter() - t)
  timing = _record.spread(seconds)
  dt = timing["median"]
  rates = _record.spread([len(table) / s for s in seconds])
  train, test = datasets.split_per_class(table.labels, args.train_ratio, args.seed)
  f = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
  nearest = np.argmax(f[test] @ f[train].T, axis=1)
  acc = float(np.mean(table.labels[train][nearest] == table.labels[test]))
  print(
    f"backbone={bb.name} pretrained={bb.pretrained} images={len(table)} size={bb.image_size} "
    f"devices={jax.device_count()} extract_s={dt:.1f} images_per_s={len(table) / dt:.1f} "
    f"(median of {args.passes} passes, {rates['min']:.1f}..{rates['max']:.1f})"
  )
  print(f"train={len(train)} test={len(test)} 1-NN cosine")
  peer_result, torch_config = None, None
  if args.torch:
    peer_result, torch_config = compare_with_torch(args, bb, table, mesh, encoder, n)
  print(f"accuracy={acc:.4f}")
  if args.record:
    _record.write(
      args.record,
      {
        "benchmark": "features",
        "backbone": bb.name,
        "pretrained": bb.pretrained,
        "images": len(table),
        "image_size": bb.image_size,
        "batch_size": args.batch_size,
        "devices": jax.device_count(),
        "extract_s": dt,
        "extract_images_per_s": len(table) / dt,
        "passes": timing,
        "nn_accuracy": acc,
        "torch": peer_result,
      },
      torch_config=torch_config,
    )


def compare_with_torch(args, bb, table, mesh, encoder, n_batch):
  """Interleaved pairs against the fastest PyTorch configuration; (results, torch config)."""
  import _peer  # pylint: disable=g-import-not-at-top

  peer = _peer.Peer(threads=os.cpu_count())
  peer.load(bb.name, bb.variables)
  same_fn = _peer.check_same_function(peer, bb)
  print(
    f"PyTorch {peer.info['torch']}, {peer.info['threads']} threads; same network: max |features "
    f"ours - PyTorch| / max |features| = {same_fn:.1e}"
  )
  batches = max(1, args.peer_images // n_batch)
  images = batches * n_batch

  def probe(c):
    return images / peer.ask(cmd="forward", batch=n_batch, batches=batches, **c)["seconds"]

  cfg, peer_rates = _peer.fastest(probe)
  x = (
    np.random.default_rng(0)
    .integers(0, 256, (n_batch, bb.image_size, bb.image_size, 3))
    .astype(np.uint8)
  )
  indices = np.arange(min(images, len(table)))
  source = input_pipeline.ImageSource(
    table, bb.image_size
  )  # built once, as a run's extraction does
  ratios, ratios_alone, ours, alone, theirs = [], [], [], [], []
  for i in range(args.pairs):
    t = time.perf_counter()
    features.extract(
      bb,
      table,
      mesh,
      batch_size=args.batch_size,
      encoder=encoder,
      indices=indices,
      log_every=0,
      source=source,
    )
    a = len(indices) / (time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(batches):
      encoder(bb.variables, x).block_until_ready()
    c = images / (time.perf_counter() - t)
    b = probe(cfg)
    ratios.append(a / b)
    ratios_alone.append(c / b)
    ours.append(a)
    alone.append(c)
    theirs.append(b)
    print(
      f"pair {i}: ours {a:.1f} images/s (decode + resize + network; network alone {c:.1f}), "
      f"PyTorch forward {b:.1f} images/s, ratio {a / b:.2f}"
    )
  peer.close()
  print(
    f"{bb.name} batch {n_batch}: ours {np.median(ours):.1f} images/s with decoding "
    f"({np.median(alone):.1f} "
    f"network alone), PyTorch {np.median(theirs):.1f} ({_peer.config_name(cfg)}); ratio median "
    f"{np.median(ratios):.2f} "
    f"(min {min(ratios):.2f}, max {max(ratios):.2f}, {args.pairs} pairs); network alone "
    f"{np.median(ratios_alone):.2f} ({min(ratios_alone):.2f}..{max(ratios_alone):.2f})"
  )
  return {
    "batch": n_batch,
    "pairs": args.pairs,
    "images_per_pair": images,
    "ours_images_per_s": _record.spread(ours),
    "ours_network_alone_images_per_s": _record.spread(alone),
    "peer": _peer.config_name(cfg),
    "peer_configs_images_per_s": peer_rates,
    "peer_images_per_s": _record.spread(theirs),
    "ratio": _record.spread(ratios),
    "ratio_network_alone": _record.spread(ratios_alone),
    "same_function_max_rel_diff": same_fn,
    "torch": peer.info["torch"],
    "torch_threads": peer.info["threads"],
  }, peer.info.get("config")


if __name__ == "__main__":
  main()
