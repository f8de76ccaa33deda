"""A DHCNN fine-tuning step, rshash_jax against PyTorch CPU on the same network and batch.

    pip install torch==2.13.0          # the benchmark's environment only (a CPU wheel here)
    python benchmarks/train_step.py --backbone=efficientnet_lite0 --batch=32
    python benchmarks/train_step.py --backbone=vgg_f --batch=32

Ours is the real step of `configs/dhcnn.py:local,finetune` (train.make_train_step:
uint8 pixels in, preprocessing, backbone, hash layer, classifier, pairwise loss over the
memory bank, quantisation, cross entropy, Adam; batch norm on stored statistics). The
peer (benchmarks/torch_peer.py, in its own process) runs the same network, loss and
optimiser from the same uint8 batch; it is timed in both memory layouts (NCHW,
channels_last) and the faster is the peer. Both sides use every core. Each pair times
`--steps` steps of ours, then of PyTorch's (median step each); the ratio is PyTorch's
step time over ours (> 1: we are faster), and the last line gives the median of
`--pairs` ratios with their range. VGG-F and the untrained hash head start from random
weights; Lite0 from ImageNet weights when the `weights` extra is installed.

Where our step's time goes, and what was changed (EfficientNet-Lite0, batch 32, 2-core
AVX2 EPYC, XLA:CPU profile of the step; the library's matrix kernels are YNNPACK's):
  * 1x1 convolutions (30 of Lite0's 50 layers) went through the convolution path: their
    kernel gradients were slow convolutions with full-size transposes (~2.5 s of the 6.2 s
    step). As matrix products (efficientnet_lite.PointwiseConv): 4.7 -> 7.1 images/s.
  * The depthwise kernel gradient took one reduce per tap; the library reduction needs
    each tap's shifted input written out first (9 or 25 full-size copies per layer,
    ~3 s of the remaining step). One variadic reduce over all taps
    (efficientnet_lite._tap_products_sum) reads the input once: 7.1 -> 12.6 images/s.
  * XLA flags tried on the old step: YNNPACK off (2.9 images/s), oneDNN on (4.5), YNNPACK
    convolutions off (6.0, kept no flag: the rewrites above do better without one).
  * What is left (2.5 s of thread time per step): matrix products 0.8 s, batch-norm
    recomputation in the backward pass 0.3 s, transposes for the 112x112 layers'
    kernel gradients 0.3 s, the stem's 3x3 convolution gradient.
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import _peer  # noqa: E402
from rshash_jax import backbones, dhcnn, sharding, train, train_state  # noqa: E402
from configs import dhcnn as dhcnn_config  # noqa: E402


def our_step(bb, batch: int, bits: int, classes: int, bank: int):
  config = dhcnn_config.get_config("local,finetune")
  config.train.batch_size = batch
  config.model.bits = bits
  model = dhcnn.DHCNN(backbone=bb.module, bits=bits, num_classes=classes)
  tx = train_state.make_optimizer(config.train, max(1, bank // batch))
  size = bb.image_size
  head = jax.jit(lambda k: model.init(k, jnp.zeros((1, size, size, 3)))["params"]["head"])(jax.random.key(0))
  params = {"head": head, "backbone": bb.variables["params"]}
  constants = {k: {"backbone": v} for k, v in bb.variables.items() if k != "params"}
  state = train_state.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                                 constants=constants, extra={"bank": jnp.zeros((bank, bits), jnp.float32)})
  rng = np.random.default_rng(0)
  labels = rng.integers(0, classes, bank)
  step = train.make_train_step(model, tx, config, jnp.asarray(labels), sharding.data_mesh(),
                               preprocess=lambda x: bb.preprocessing(x, bb.module.dtype))
  key = jax.random.key_data(jax.random.key(0))
  box = {"state": state}

  def run(steps: int):
    times = []
    for _ in range(steps):
      rows = rng.choice(bank, batch, replace=False)
      b = {"x": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8), "label": labels[rows], "row": rows}
      t = time.perf_counter()
      box["state"], metrics = step(box["state"], b, key)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - t)
    return times
  return run


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--backbone", default="efficientnet_lite0", choices=("efficientnet_lite0", "vgg_f"))
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--steps", type=int, default=3, help="steps per side and pair (median taken)")
  p.add_argument("--pairs", type=int, default=5)
  p.add_argument("--bits", type=int, default=64)
  p.add_argument("--classes", type=int, default=21)
  p.add_argument("--bank", type=int, default=1680, help="training-set size (memory bank rows)")
  args = p.parse_args()

  pretrained = args.backbone == "efficientnet_lite0" and _peer.have_lite0_weights()
  bb = backbones.create(args.backbone, pretrained=pretrained, seed=0)
  peer = _peer.Peer(threads=os.cpu_count())
  peer.load(args.backbone, bb.variables, bits=args.bits, classes=args.classes)
  print(f"backbone={args.backbone} pretrained={pretrained} batch={args.batch} jax={jax.__version__} "
        f"devices={jax.device_count()} torch={peer.info['torch']} torch_threads={peer.info['threads']}")
  print(f"same network: max |features ours - PyTorch| / max |features| = {_peer.check_same_function(peer, bb):.1e}")

  ours = our_step(bb, args.batch, args.bits, args.classes, args.bank)
  t = time.perf_counter()
  ours(2)  # compile + the first, slower step
  print(f"ours: compile + 2 steps {time.perf_counter() - t:.1f} s")
  layouts = {}
  for layout in ("nchw", "channels_last"):
    s = peer.ask(cmd="train", batch=args.batch, steps=args.steps + 1, layout=layout, bank=args.bank)["seconds"]
    layouts[layout] = float(np.median(s[1:]))
  layout = min(layouts, key=layouts.get)
  print("PyTorch layouts, images/s: " + ", ".join(f"{k} {args.batch / v:.2f}" for k, v in layouts.items())
        + f" -> peer: {layout}")
  ratios, ours_rate, theirs_rate = [], [], []
  for i in range(args.pairs):
    a = float(np.median(ours(args.steps)))
    b = float(np.median(peer.ask(cmd="train", batch=args.batch, steps=args.steps, layout=layout,
                                 bank=args.bank)["seconds"]))
    ratios.append(b / a)
    ours_rate.append(args.batch / a)
    theirs_rate.append(args.batch / b)
    print(f"pair {i}: ours {args.batch / a:.2f} images/s, PyTorch {args.batch / b:.2f} images/s, ratio {b / a:.2f}")
  peer.close()
  print(f"{args.backbone} batch {args.batch}: ours {np.median(ours_rate):.2f} images/s, PyTorch "
        f"{np.median(theirs_rate):.2f} images/s ({layout}); ratio median {np.median(ratios):.2f} "
        f"(min {min(ratios):.2f}, max {max(ratios):.2f}, {args.pairs} pairs)")


if __name__ == "__main__":
  main()
