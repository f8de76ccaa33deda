"""A DHCNN fine-tuning step, rshash_jax against PyTorch CPU on the same network and batch.

    pip install torch==2.13.0          # the benchmark's environment only (a CPU wheel here)
    python benchmarks/train_step.py --backbone=efficientnet_lite0 --batch=32
    python benchmarks/train_step.py --backbone=vgg_f --batch=32
    # On a GPU (the peer then runs on the same GPU; bf16 compute on both sides), with the
    # forward pass (features, network alone) timed too and MFU printed:
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 python benchmarks/train_step.py --backbone=vgg_f \
        --batch=256 --steps=5 --pairs=3 --forward_batches=10 --dtype=bfloat16

Ours is the real step of `configs/dhcnn.py:local,finetune` (dhcnn_step.make_train_step:
uint8 pixels in, preprocessing, backbone, hash layer, classifier, pairwise loss over the
memory bank, quantisation, cross entropy, Adam; batch norm on stored statistics). The
peer (benchmarks/torch_peer.py, in its own process) runs the same network, loss and
optimiser from the same uint8 batch; it is timed eager and torch.compile'd, in both
memory layouts (NCHW, channels_last), and the fastest is the peer. Both sides use every
core. Each pair times `--steps` steps of ours, then of PyTorch's (median step each); the
ratio is PyTorch's step time over ours (> 1: we are faster), and the last line gives the median of
`--pairs` ratios with their range. VGG-F and the untrained hash head start from random
weights; Lite0 from ImageNet weights when the `weights` extra is installed. Batches are on
the device before the clock starts, on both sides. MFU: model FLOPs (convolutions and
matrix products of the forward's jaxpr, x3 per step) over the chip's dense bf16 peak and
over a bf16 matrix product measured in the run. Measured on an H100, batch 256
(docs/performance.md):
VGG-F 4.38x PyTorch, MFU 18% (23% at batch 1024); Lite0 1.34x, MFU 1.4% (its rate varies
run to run with the autotuner's choice of depthwise-gradient kernel).

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
  * 1x1 convolutions as products of 2-D matrices (x.reshape(-1, C) @ kernel): contracted
    over (n, h, w) of the 4-D array, XLA:CPU's dot canonicalisation transposed the whole
    output gradient for each kernel gradient (blocks_1 expand: a 154 MB copy, 261 ms, then
    a 164 ms dot). Profile 4.0 -> 3.2 s; 0.76x -> 1.00x PyTorch (a slower day: 9.9 images/s).
  * Batch norm on stored statistics with a written-out gradient
    (efficientnet_lite.frozen_bn_act): autodiff kept z - mean for the scale's gradient,
    one more full-size array per layer written forward and read back; the custom VJP
    keeps z and computes sum(g z) - mean sum(g). Profile 3.1 -> 2.3 s; 1.00x -> 1.10x.
  * What is left (2.3 s per step): the library's matrix products ~1.3 s, the depthwise
    kernel gradients' reduce ~0.4 s, the depthwise and ReLU6 selects and pads.
  * One CPU device per core (--xla_force_host_platform_device_count=2, batch split over
    them) ran 0.83x against 0.76x before the two changes above; not adopted.

VGG-F (batch 32, same machine): each layer's forward + backward timed alone against
PyTorch's showed the convolutions' kernel gradients as the gap (jitted, kernel gradient
alone: conv1 285 ms, conv2 690 ms, conv3-5 87 ms each; conv2's whole forward + backward
in PyTorch ~415 ms). XLA:CPU runs them as convolutions with the batch as feature
dimension and the output map as window. backbones/conv.py computes them as matrix
products over each tap's strided input slice (conv1: over all taps' patches stacked):
194 / 229 / 74 ms. The step went from 8.68 images/s (0.91x PyTorch, 0.75..0.92) to 11.99
(1.28x, 1.12..1.33), `python benchmarks/train_step.py --backbone=vgg_f`. Then LRN's
gradient written out (vgg_f.lrn, CPU only: on the GPU autodiff's form was faster): the
step 6.9 -> 9.6 images/s interleaved on a slower day; 1.41x PyTorch (1.38..1.52).
"""

import argparse
import dataclasses
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import _peer  # noqa: E402
import _record  # noqa: E402
from rshash_jax.models import backbones, dhcnn  # noqa: E402
from rshash_jax.parallel import sharding  # noqa: E402
from rshash_jax.training import dhcnn_step, train_state  # noqa: E402
from configs import dhcnn as dhcnn_config  # noqa: E402


# Dense bf16 peak of the chips we are lent (datasheet, FLOP/s); MFU is also printed
# against a bf16 matrix product measured in the same run.
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12}


def _jaxpr_matmul_flops(jaxpr) -> float:
  """2 x multiply-adds of every convolution and matrix product in a jaxpr (sub-jaxprs
  included): the FLOPs that MFU counts. Elementwise work is left out, as usual."""
  total = 0.0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "conv_general_dilated":
      lhs, rhs = (v.aval for v in eqn.invars)
      out = eqn.outvars[0].aval
      dn = eqn.params["dimension_numbers"]
      kernel_in = rhs.shape[dn.rhs_spec[1]]  # input features per group
      window = np.prod([rhs.shape[d] for d in dn.rhs_spec[2:]])
      total += 2.0 * np.prod(out.shape) * kernel_in * window
    elif eqn.primitive.name == "dot_general":
      (lc, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval
      total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs.shape[d] for d in lc])
    for v in eqn.params.values():
      for j in v if isinstance(v, (tuple, list)) else (v,):
        if isinstance(j, jax.extend.core.ClosedJaxpr):
          total += _jaxpr_matmul_flops(j.jaxpr)
        elif isinstance(j, jax.extend.core.Jaxpr):
          total += _jaxpr_matmul_flops(j)
  return total


def model_flops_per_image(model, variables, size: int) -> float:
  """Forward FLOPs of backbone + hash head for one image: convolutions and matrix products
  counted from the forward's jaxpr, the same on every platform (XLA's cost analysis on GPU
  misses the cuDNN convolutions). A train step counts 3x this per image (forward, and the
  two products of each layer's backward pass)."""
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  return _jaxpr_matmul_flops(jax.make_jaxpr(lambda v, x: model.apply(v, x))(variables, x).jaxpr)


def matmul_flops_per_s(n: int = 8192, reps: int = 10) -> float:
  """A bf16 [n, n] x [n, n] product on the default device, best of 3 runs of `reps`."""
  a = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
  b = jax.random.normal(jax.random.key(2), (n, n), jnp.bfloat16)
  fn = jax.jit(lambda a, b: jax.lax.fori_loop(0, reps, lambda i, c: (a + c[0, 0]) @ b, a))
  fn(a, b).block_until_ready()
  best = float("inf")
  for _ in range(3):
    t = time.perf_counter()
    fn(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n**3 * reps / best


def our_step(bb, batch: int, bits: int, classes: int, bank: int):
  config = dhcnn_config.get_config("local,finetune")
  config.train.batch_size = batch
  config.model.bits = bits
  model = dhcnn.DHCNN(backbone=bb.module, bits=bits, num_classes=classes)
  tx = train_state.make_optimizer(config.train, max(1, bank // batch))
  size = bb.image_size
  head = jax.jit(lambda k: model.init(k, jnp.zeros((1, size, size, 3)))["params"]["head"])(
    jax.random.key(0)
  )
  own = jax.tree.map(jnp.array, bb.variables)  # copies: the step donates the state's buffers
  params = {"head": head, "backbone": own["params"]}
  constants = {k: {"backbone": v} for k, v in own.items() if k != "params"}
  state = train_state.TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=tx.init(params),
    constants=constants,
    extra={"bank": jnp.zeros((bank, bits), jnp.float32)},
  )
  rng = np.random.default_rng(0)
  labels = rng.integers(0, classes, bank)
  mesh = sharding.data_mesh()
  step = dhcnn_step.make_train_step(
    model,
    tx,
    config,
    jnp.asarray(labels),
    mesh,
    preprocess=lambda x: bb.preprocessing(x, bb.module.dtype),
  )
  key = jax.random.key_data(jax.random.key(0))
  box = {"state": state}
  # A few batches placed on the devices before the clock starts (as the peer's are).
  pool = []
  for _ in range(4):
    rows = rng.choice(bank, batch, replace=False)
    b = {
      "x": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
      "label": labels[rows],
      "row": rows,
    }
    pool.append(jax.device_put(b, sharding.sharded_rows(mesh)))

  def run(steps: int):
    times = []
    for i in range(steps):
      t = time.perf_counter()
      box["state"], metrics = step(box["state"], pool[i % len(pool)], key)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - t)
    return times

  shapes = jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), {"params": params, **constants}
  )
  return run, model, shapes  # shapes only: the step donates the state's buffers


def our_forward(bb, batch: int):
  """Backbone features of a batch of normalised images already on the device: the network
  alone, as the peer's `forward` command."""
  x = jax.device_put(jax.random.normal(jax.random.key(0), (batch, bb.image_size, bb.image_size, 3)))
  fn = jax.jit(lambda v, x: bb.module.apply(v, x)["features"])
  fn(bb.variables, x).block_until_ready()

  def run(batches: int):
    t = time.perf_counter()
    for _ in range(batches):
      out = fn(bb.variables, x)
    out.block_until_ready()
    return time.perf_counter() - t

  return run


def main():
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument(
    "--backbone", default="efficientnet_lite0", choices=("efficientnet_lite0", "vgg_f")
  )
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--steps", type=int, default=3, help="steps per side and pair (median taken)")
  p.add_argument("--pairs", type=int, default=5)
  p.add_argument("--bits", type=int, default=64)
  p.add_argument("--classes", type=int, default=21)
  p.add_argument("--bank", type=int, default=1680, help="training-set size (memory bank rows)")
  p.add_argument(
    "--dtype",
    default="float32",
    choices=("float32", "bfloat16"),
    help="compute dtype of both sides (parameters and optimiser stay float32)",
  )
  p.add_argument(
    "--depthwise",
    default="auto",
    choices=("auto", "taps", "conv"),
    help="EfficientNet-Lite's depthwise implementation (efficientnet_lite.depthwise_impl)",
  )
  p.add_argument(
    "--forward_batches",
    type=int,
    default=0,
    help="> 0: also time this many forward batches (features, the network alone) per side",
  )
  p.add_argument("--peer", default="torch", choices=("torch", "none"))
  p.add_argument("--record", default=None, help="write a JSON record here (benchmarks/_record.py)")
  args = p.parse_args()

  platform = jax.default_backend()
  pretrained = args.backbone == "efficientnet_lite0" and _peer.have_lite0_weights()
  bb = backbones.create(args.backbone, pretrained=pretrained, seed=0, dtype=jnp.dtype(args.dtype))
  if args.backbone.startswith("efficientnet"):
    bb = dataclasses.replace(bb, module=bb.module.clone(depthwise=args.depthwise))
  peer = None
  if args.peer == "torch":
    peer = _peer.Peer(threads=os.cpu_count())
    loaded = peer.load(
      args.backbone,
      bb.variables,
      bits=args.bits,
      classes=args.classes,
      device="cuda" if platform == "gpu" else "cpu",
      dtype=args.dtype,
    )
  kind = jax.devices()[0].device_kind
  print(
    f"backbone={args.backbone} pretrained={pretrained} batch={args.batch} dtype={args.dtype} "
    f"jax={jax.__version__} devices={jax.device_count()} ({platform}: {kind}) "
    + (
      f"torch={peer.info['torch']} on {loaded['device']} torch_threads={peer.info['threads']}"
      if peer
      else "no peer"
    )
  )
  same_fn, peer_config = None, peer.info.get("config") if peer else None
  if peer:
    same_fn = _peer.check_same_function(peer, bb)
    print(
      f"same network: max |features ours - PyTorch| / max |features| = {same_fn:.1e}"
      " (ours in the run's dtype, PyTorch float32)"
    )

  ours, model, variables = our_step(bb, args.batch, args.bits, args.classes, args.bank)
  counted = (
    model  # depthwise layers counted as the grouped convolutions they are, whatever runs them
  )
  if args.backbone.startswith("efficientnet"):
    counted = model.clone(backbone=bb.module.clone(depthwise="conv"))
  flops_step = 3 * args.batch * model_flops_per_image(counted, variables, bb.image_size)
  t = time.perf_counter()
  ours(2)  # compile + the first, slower step
  print(f"ours: compile + 2 steps {time.perf_counter() - t:.1f} s")
  peak = next((v for k, v in PEAK_BF16.items() if k in kind), None) if platform == "gpu" else None
  ceiling = matmul_flops_per_s() if platform == "gpu" else None
  cfg, peer_rates = {"layout": "nchw", "compile": False}, {}
  if peer:

    def probe(c):  # the first step (torch.compile's compilation) is not counted
      s = peer.ask(cmd="train", batch=args.batch, steps=args.steps + 1, bank=args.bank, **c)
      return args.batch / float(np.median(s["seconds"][1:]))

    cfg, peer_rates = _peer.fastest(probe)
  ratios, ours_rate, theirs_rate = [], [], []
  for i in range(args.pairs):
    a = float(np.median(ours(args.steps)))
    ours_rate.append(args.batch / a)
    line = f"pair {i}: ours {args.batch / a:.2f} images/s"
    if peer:
      asked = peer.ask(cmd="train", batch=args.batch, steps=args.steps, bank=args.bank, **cfg)
      b = float(np.median(asked["seconds"]))
      ratios.append(b / a)
      theirs_rate.append(args.batch / b)
      line += f", PyTorch {args.batch / b:.2f} images/s, ratio {b / a:.2f}"
    print(line)
  step_s = args.batch / float(np.median(ours_rate))
  print(
    f"model FLOPs per step {flops_step / 1e9:.1f} G (3 x forward x batch): "
    f"{flops_step / step_s / 1e12:.2f} "
    "TFLOP/s"
    + (
      f", MFU {100 * flops_step / step_s / peak:.1f}% of {peak / 1e12:.0f} TFLOP/s bf16 peak"
      if peak
      else ""
    )
    + (
      f", {100 * flops_step / step_s / ceiling:.1f}% of a measured bf16 matmul "
      f"({ceiling / 1e12:.0f} TFLOP/s)"
      if ceiling
      else ""
    )
  )
  forward_result = None
  if args.forward_batches:
    fwd = our_forward(bb, args.batch)
    f_ours, f_theirs = [], []
    for _ in range(args.pairs):
      f_ours.append(args.batch * args.forward_batches / fwd(args.forward_batches))
      if peer:
        sec = peer.ask(cmd="forward", batch=args.batch, batches=args.forward_batches, **cfg)[
          "seconds"
        ]
        f_theirs.append(args.batch * args.forward_batches / sec)
    fr = np.asarray(f_ours) / np.asarray(f_theirs) if peer else None
    print(
      f"forward (features, network alone): ours {np.median(f_ours):.1f} images/s"
      + (
        f", PyTorch {np.median(f_theirs):.1f} images/s, ratio median {np.median(fr):.2f} "
        f"(min {fr.min():.2f}, max {fr.max():.2f})"
        if peer
        else ""
      )
    )
    forward_result = {
      "batches": args.forward_batches,
      "ours_images_per_s": _record.spread(f_ours),
      "peer_images_per_s": _record.spread(f_theirs) if peer else None,
      "ratio": _record.spread(fr) if peer else None,
    }
  if peer:
    peer.close()
    print(
      f"{args.backbone} batch {args.batch} {args.dtype}: ours {np.median(ours_rate):.2f} "
      f"images/s, PyTorch {np.median(theirs_rate):.2f} images/s ({_peer.config_name(cfg)}); "
      f"ratio median {np.median(ratios):.2f} "
      f"(min {min(ratios):.2f}, max {max(ratios):.2f}, {args.pairs} pairs)"
    )
  if args.record:
    _record.write(
      args.record,
      {
        "benchmark": "train_step",
        "backbone": args.backbone,
        "pretrained": pretrained,
        "batch": args.batch,
        "dtype": args.dtype,
        "steps_per_side": args.steps,
        "pairs": args.pairs,
        "devices": f"{jax.device_count()} x {kind}",
        "ours_images_per_s": _record.spread(ours_rate),
        "peer": _peer.config_name(cfg) if peer else None,
        "peer_configs_images_per_s": peer_rates,
        "peer_images_per_s": _record.spread(theirs_rate) if peer else None,
        "ratio": _record.spread(ratios) if peer else None,
        "same_function_max_rel_diff": same_fn,
        "model_gflops_per_step": flops_step / 1e9,
        "forward": forward_result,
      },
      torch_config=peer_config,
    )


if __name__ == "__main__":
  main()
