"""PyTorch peer for benchmarks/features.py and benchmarks/train_step.py: the same
networks in PyTorch, run in a worker process of their own, on the CPU or a CUDA GPU.

torch is never a dependency of rshash_jax: install it only in the benchmark's environment,
`pip install torch==2.13.0` (a CPU wheel here; other specs pull GBs of CUDA).

Why a separate process: timed in one process, the two frameworks slow each other down
(their allocators and thread pools share the address space; our train step measured 12.6
images/s alone and 10-11 interleaved with PyTorch in the same process). Here the caller
and this worker take turns, one command at a time, the idle side blocked on a pipe.

Protocol: one JSON command per line on stdin, one JSON answer per line on stdout.
  {"cmd": "load", "model": "efficientnet_lite0" | "vgg_f", "weights": "state.npz", "classes": C,
   "bits": K, "device": "cpu" | "cuda", "dtype": "float32" | "bfloat16"}
  {"cmd": "features", "input": "x.npy", "output": "y.npy", "layout": "nchw" | "channels_last"}
  {"cmd": "forward", "batch": B, "batches": N, "layout": L, "compile": C} -> {"seconds": s}
  {"cmd": "train", "batch": B, "steps": N, "layout": L, "compile": C, "bank": N_train}
      -> {"seconds": [s, ...]}
"compile": false runs eager; true runs `torch.compile` (inductor; on a GPU its
"max-autotune" mode, which adds CUDA graphs and autotuned kernels); each (layout, compile)
pair is compiled once per worker, on its first call (callers discard that call's time).
On a GPU, `torch.backends.cudnn.benchmark` is on: cuDNN picks its fastest algorithms, as
XLA autotunes ours. The hello line reports torch's version, threads and build
configuration (`torch.__config__.show()`), which benchmark records keep.
The weights file holds the rshash_jax variables under PyTorch names and layouts
(`state_dict`), so both sides compute the same function; `features` lets the caller
check that. Inputs are the backbone's normalised NCHW float32 tensors (no decoding here:
PyTorch is timed on the network alone). On "cuda" the inputs are made on the GPU before
the clock starts and every timed region ends with torch.cuda.synchronize(); "bfloat16"
runs forward and train under torch.autocast (float32 weights and optimiser, as ours).
"""

import json
import math
import os
import sys
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

# EfficientNet-Lite0 blocks (kernel, stride, expand, in, out), as rshash_jax's block_config(1.0,
# 1.0).
_LITE0 = [
  (3, 1, 1, 32, 16),
  (3, 2, 6, 16, 24),
  (3, 1, 6, 24, 24),
  (5, 2, 6, 24, 40),
  (5, 1, 6, 40, 40),
  (3, 2, 6, 40, 80),
  (3, 1, 6, 80, 80),
  (3, 1, 6, 80, 80),
  (5, 1, 6, 80, 112),
  (5, 1, 6, 112, 112),
  (5, 1, 6, 112, 112),
  (5, 2, 6, 112, 192),
  (5, 1, 6, 192, 192),
  (5, 1, 6, 192, 192),
  (5, 1, 6, 192, 192),
  (3, 1, 6, 192, 320),
]


class SameConv(nn.Conv2d):
  """Conv2d with TensorFlow "SAME" padding: symmetric padding inside the convolution
  where SAME is symmetric, an explicit pad only where it is not (stride 2, even input)."""

  def forward(self, x):
    k, s = self.kernel_size[0], self.stride[0]
    h = x.shape[-1]
    total = max((math.ceil(h / s) - 1) * s + k - h, 0)
    if total % 2:
      x = F.pad(x, (total // 2, total - total // 2, total // 2, total - total // 2))
      return F.conv2d(x, self.weight, self.bias, self.stride, 0, 1, self.groups)
    return F.conv2d(x, self.weight, self.bias, self.stride, total // 2, 1, self.groups)


class MBConv(nn.Module):
  def __init__(self, k, s, e, cin, cout):
    super().__init__()
    mid = cin * e
    if e != 1:
      self._expand_conv = SameConv(cin, mid, 1, bias=False)
      self._bn0 = nn.BatchNorm2d(mid, eps=1e-3)
    self._depthwise_conv = SameConv(mid, mid, k, s, groups=mid, bias=False)
    self._bn1 = nn.BatchNorm2d(mid, eps=1e-3)
    self._project_conv = SameConv(mid, cout, 1, bias=False)
    self._bn2 = nn.BatchNorm2d(cout, eps=1e-3)
    self.expand, self.residual = e != 1, s == 1 and cin == cout

  def forward(self, x):
    h = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
    h = self._bn2(self._project_conv(F.relu6(self._bn1(self._depthwise_conv(h)))))
    return h + x if self.residual else h


class EfficientNetLite0(nn.Module):
  """lukemelas parameter names (those of efficientnet-lite0-57934424.pth)."""

  feature_dim = 1280

  def __init__(self, classes=1000):
    super().__init__()
    self._conv_stem = SameConv(3, 32, 3, 2, bias=False)
    self._bn0 = nn.BatchNorm2d(32, eps=1e-3)
    self._blocks = nn.ModuleList([MBConv(*b) for b in _LITE0])
    self._conv_head = SameConv(320, 1280, 1, bias=False)
    self._bn1 = nn.BatchNorm2d(1280, eps=1e-3)
    self._fc = nn.Linear(1280, classes)

  def features(self, x):
    x = F.relu6(self._bn0(self._conv_stem(x)))
    for b in self._blocks:
      x = b(x)
    return F.relu6(self._bn1(self._conv_head(x))).mean((2, 3))


class VGGF(nn.Module):
  """VGG-F as rshash_jax.models.backbones.vgg_f (MatConvNet's LRN: alpha not divided by depth)."""

  feature_dim = 4096

  def __init__(self, classes=1000, lrn=(5.0, 2.0, 1e-4, 0.75)):
    super().__init__()
    self.conv1, self.conv2 = nn.Conv2d(3, 64, 11, 4), nn.Conv2d(64, 256, 5, 1, 2)
    self.conv3, self.conv4, self.conv5 = (nn.Conv2d(256, 256, 3, 1, 1) for _ in range(3))
    # fc6/fc7 as their users write them: Linear layers on the flattened (C, H, W) map.
    self.fc6, self.fc7 = nn.Linear(256 * 6 * 6, 4096), nn.Linear(4096, 4096)
    self.fc8 = nn.Linear(4096, classes)
    d, kappa, alpha, beta = lrn
    self.lrn = nn.LocalResponseNorm(int(d), alpha=alpha * d, beta=beta, k=kappa)

  @staticmethod
  def _pool(x):
    return F.max_pool2d(F.pad(x, (0, 1, 0, 1), value=-math.inf), 3, 2)

  def features(self, x):
    x = self._pool(self.lrn(F.relu(self.conv1(x))))
    x = self._pool(self.lrn(F.relu(self.conv2(x))))
    x = self._pool(F.relu(self.conv5(F.relu(self.conv4(F.relu(self.conv3(x)))))))
    return F.relu(self.fc7(F.relu(self.fc6(x.flatten(1)))))


class DHCNN(nn.Module):
  """Backbone + hash layer + classifier on the codes, as rshash_jax.dhcnn."""

  def __init__(self, backbone, bits, classes):
    super().__init__()
    self.backbone = backbone
    self.hash, self.classifier = nn.Linear(backbone.feature_dim, bits), nn.Linear(bits, classes)

  def forward(self, x):
    u = self.hash(self.backbone.features(x))
    return u, self.classifier(u)


def _build(cmd):
  backbone = {"efficientnet_lite0": EfficientNetLite0, "vgg_f": VGGF}[cmd["model"]]()
  if cmd.get("weights"):
    with np.load(cmd["weights"]) as z:
      state = {k: torch.from_numpy(z[k]) for k in z.files}
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.startswith(("_fc", "fc8")) and "num_batches" not in m]
    if missing or unexpected:
      raise ValueError(f"{cmd['weights']}: missing {missing[:5]}, unexpected {unexpected[:5]}")
  return DHCNN(backbone, cmd.get("bits", 64), cmd.get("classes", 21))


_RUN = {"device": "cpu", "dtype": "float32"}


def _sync():
  if _RUN["device"] == "cuda":
    torch.cuda.synchronize()


def _autocast():
  return torch.autocast(_RUN["device"], dtype=torch.bfloat16, enabled=_RUN["dtype"] == "bfloat16")


def _layout(model, x, layout):
  if layout == "channels_last":
    return model.to(memory_format=torch.channels_last), x.contiguous(
      memory_format=torch.channels_last
    )
  return model.to(memory_format=torch.contiguous_format), x.contiguous()


def _frozen_batch_norm(model):
  """Training as rshash_jax trains: batch norm on its stored statistics (dhcnn fine-tunes
  with batches too small to re-estimate them), dropout-free backbone."""
  model.train()
  for m in model.modules():
    if isinstance(m, nn.BatchNorm2d):
      m.eval()


_COMPILED = {}


def _maybe_compiled(key, fn, cmd):
  """`fn`, or its torch.compile'd form (cached per key) when the command asks for it."""
  if not cmd.get("compile"):
    return fn
  if key not in _COMPILED:
    mode = "max-autotune" if _RUN["device"] == "cuda" else None
    _COMPILED[key] = torch.compile(fn, mode=mode)
  return _COMPILED[key]


def _train(model, cmd):
  b, n_bank, steps = cmd["batch"], cmd["bank"], cmd["steps"]
  dev = _RUN["device"]
  classes = model.classifier.out_features
  g = torch.Generator().manual_seed(0)
  bank = torch.zeros(n_bank, model.hash.out_features, device=dev)
  bank_labels = torch.randint(0, classes, (n_bank,), generator=g).to(dev)
  opt = torch.optim.Adam(model.parameters(), lr=1e-5)
  size = 224
  _frozen_batch_norm(model)
  fmt = torch.channels_last if cmd["layout"] == "channels_last" else torch.contiguous_format
  model = model.to(memory_format=fmt)  # once: the timed step converts only its input
  net = _maybe_compiled(("train", cmd["layout"]), model, cmd)
  times = []
  for _ in range(steps):
    rows = torch.randperm(n_bank, generator=g)[:b].to(dev)
    pixels = torch.randint(0, 256, (b, size, size, 3), dtype=torch.uint8, generator=g).to(dev)
    _sync()
    t = time.perf_counter()
    # The step as rshash_jax's: uint8 NHWC pixels in, preprocessing inside the step.
    x = pixels.permute(0, 3, 1, 2).float().sub_(127.0).div_(128.0)
    with _autocast():
      u, logits = net(x.contiguous(memory_format=fmt))
    u, logits = u.float(), logits.float()
    y = bank_labels[rows]
    bank[rows] = u.detach()
    theta = 0.5 * u @ bank.T
    s = (y[:, None] == bank_labels[None, :]).float()
    pairwise = (F.softplus(theta) - s * theta).sum()
    quant = ((torch.sign(u).detach() - u) ** 2).sum()
    loss = 0.2 * (pairwise + 25.0 * quant) / (b * n_bank) + 0.8 * F.cross_entropy(logits, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    _sync()
    times.append(time.perf_counter() - t)
  return times


def main():
  torch.set_num_threads(int(os.environ.get("TORCH_THREADS", os.cpu_count())))
  torch.backends.cudnn.benchmark = True
  model = None
  hello = {
    "torch": torch.__version__,
    "threads": torch.get_num_threads(),
    "config": torch.__config__.show(),
  }
  print(json.dumps(hello), flush=True)
  for line in sys.stdin:
    cmd = json.loads(line)
    try:
      if cmd["cmd"] == "load":
        _RUN.update(device=cmd.get("device", "cpu"), dtype=cmd.get("dtype", "float32"))
        model = _build(cmd).to(_RUN["device"])
        out = {
          "ok": True,
          "device": torch.cuda.get_device_name() if _RUN["device"] == "cuda" else "cpu",
        }
      elif cmd["cmd"] == "features":  # float32 always: this is the same-function check
        x = torch.from_numpy(np.load(cmd["input"])).to(_RUN["device"])
        model.eval()
        with torch.no_grad():
          m, x = _layout(model, x, cmd.get("layout", "nchw"))
          np.save(cmd["output"], m.backbone.features(x).float().cpu().numpy())
        out = {"ok": True}
      elif cmd["cmd"] == "forward":
        x = torch.randn(cmd["batch"], 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(
          _RUN["device"]
        )
        model.eval()
        with torch.no_grad(), _autocast():
          m, x = _layout(model, x, cmd["layout"])
          fwd = _maybe_compiled(("forward", cmd["layout"]), m.backbone.features, cmd)
          for _ in range(2):  # warm-up (compilation, oneDNN primitives, cuDNN's choice)
            fwd(x)
          _sync()
          t = time.perf_counter()
          for _ in range(cmd["batches"]):
            fwd(x)
          _sync()
          out = {"seconds": time.perf_counter() - t}
      elif cmd["cmd"] == "train":
        out = {"seconds": _train(model, cmd)}
      else:
        raise ValueError(f"unknown command {cmd['cmd']!r}")
    except Exception as e:  # the caller prints it and stops
      out = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
  main()
