"""MrHash: soft assignment, target and KL against numpy; release-format reader; baselines; CLI."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from rshash_jax.data import datasets, input_pipeline, multisource
from rshash_jax.models import backbones, baselines, mrhash
from rshash_jax.training import train_mrhash

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
import mrhash as mrhash_config  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_soft_assignment_target_and_kl_match_numpy():
  rng = np.random.default_rng(0)
  z = rng.standard_normal((7, 5))
  mu = rng.standard_normal((3, 5))
  q_np = np.empty((7, 3))
  for i in range(7):
    for j in range(3):
      q_np[i, j] = 1.0 / (1.0 + np.sum((z[i] - mu[j]) ** 2))
  q_np /= q_np.sum(1, keepdims=True)
  q = np.asarray(mrhash.soft_assign(jnp.asarray(z, jnp.float32), jnp.asarray(mu, jnp.float32)))
  np.testing.assert_allclose(q, q_np, rtol=1e-5)
  f = q_np.sum(0)
  p_np = q_np**2 / f
  p_np /= p_np.sum(1, keepdims=True)
  p = np.asarray(mrhash.target_distribution(jnp.asarray(q_np, jnp.float32)))
  np.testing.assert_allclose(p, p_np, rtol=1e-5)
  q2 = rng.dirichlet(np.ones(3), 7)
  kl_rows = np.sum(p_np * np.log(p_np / q2), axis=1)
  np.testing.assert_allclose(
    float(mrhash.kl_divergence(jnp.asarray(p_np), jnp.asarray(q2), "batchmean")),
    kl_rows.mean(),
    rtol=1e-5,
  )
  np.testing.assert_allclose(
    float(mrhash.kl_divergence(jnp.asarray(p_np), jnp.asarray(q2), "mean")),
    kl_rows.mean() / 3,
    rtol=1e-5,
  )
  with pytest.raises(ValueError, match="kl_reduction"):
    mrhash.kl_divergence(jnp.asarray(p_np), jnp.asarray(q2), "sum")


def test_target_sharpens_and_rebalances():
  q = jnp.asarray([[0.6, 0.4], [0.55, 0.45], [0.3, 0.7]])
  p = np.asarray(mrhash.target_distribution(q))
  assert p[0, 0] > 0.6 and p[2, 1] > 0.7  # sharper
  np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-6)


def test_reconstruction_loss_weights():
  a, b = jnp.ones((2, 3)), jnp.zeros((2, 3))
  assert float(mrhash.reconstruction_loss([a, a], [b, b])) == pytest.approx(0.1 + 1.0)


def test_optional_code_terms_match_numpy():
  """pair / quant / balance terms against numpy formulas; weights 0 leave the paper's loss."""
  rng = np.random.default_rng(5)
  h = np.tanh(rng.standard_normal((6, 8)))
  p = rng.dirichlet(np.ones(4) * 0.3, 6)
  cos = (p @ p.T) / np.outer(np.linalg.norm(p, axis=1), np.linalg.norm(p, axis=1))
  want_pair = np.mean((h @ h.T / 8 - (2 * cos - 1)) ** 2)
  np.testing.assert_allclose(
    float(mrhash.pair_term(jnp.asarray(h), jnp.asarray(p))), want_pair, rtol=1e-5
  )
  np.testing.assert_allclose(
    float(mrhash.quant_term(jnp.asarray(h))), np.mean((np.abs(h) - 1) ** 2), rtol=1e-5
  )
  np.testing.assert_allclose(
    float(mrhash.balance_term(jnp.asarray(h))), np.mean(h.mean(0) ** 2), rtol=1e-5
  )
  # identical pseudo-label rows and identical codes of +-1 cost nothing
  ones = jnp.ones((3, 4))
  assert float(mrhash.pair_term(jnp.sign(ones), jnp.asarray([[1.0, 0.0]] * 3))) == 0.0
  q = jnp.asarray(rng.dirichlet(np.ones(4), 6), jnp.float32)
  out = {"h": jnp.asarray(h, jnp.float32), "q_img": q, "q_feat": q, "recons": [jnp.zeros((6, 3))]}
  srcs = [jnp.ones((6, 3))]
  base, parts = mrhash.stage2_loss(out, jnp.asarray(p, jnp.float32), srcs)
  np.testing.assert_allclose(
    float(base), float(parts["kl_img"] + parts["kl_feat"] + 5.0 * parts["recon"]), rtol=1e-6
  )
  full, parts = mrhash.stage2_loss(
    out, jnp.asarray(p, jnp.float32), srcs, pair_weight=2.0, quant_weight=0.5, balance_weight=3.0
  )
  np.testing.assert_allclose(
    float(full - base),
    2.0 * want_pair + 0.5 * np.mean((np.abs(h) - 1) ** 2) + 3.0 * np.mean(h.mean(0) ** 2),
    rtol=1e-4,
  )


def test_itq_and_lsh():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((200, 20)) @ rng.standard_normal((20, 20))
  itq = baselines.fit_itq(x, 8, seed=0)
  lsh = baselines.fit_lsh(x, 8, seed=0)
  codes = itq(x)
  assert codes.shape == (200, 8) and set(np.unique(codes)) <= {-1, 1}
  # The projection is PCA times an orthogonal rotation: columns orthonormal.
  np.testing.assert_allclose(itq.projection.T @ itq.projection, np.eye(8), atol=1e-8)
  # ITQ lowers the quantisation error of the PCA projection it starts from.
  xc = x - x.mean(0)
  _, _, vt = np.linalg.svd(xc, full_matrices=False)
  v = xc @ vt[:8].T
  err_pca = np.sum((np.where(v >= 0, 1, -1) - v) ** 2)
  vr = xc @ itq.projection
  assert np.sum((codes - vr) ** 2) < err_pca
  np.testing.assert_array_equal(lsh(x), baselines.fit_lsh(x, 8, seed=0)(x))
  with pytest.raises(ValueError, match="ITQ needs bits"):
    baselines.fit_itq(x[:5], 8)


def test_itq_in_row_slices_is_itq_of_the_whole_matrix(tmp_path, monkeypatch):
  """The sliced fit (covariance PCA, V in a scratch file) equals the textbook fit in memory
  (SVD PCA, the same sign rule, the same rotation start), whatever the slice size."""
  rng = np.random.default_rng(3)
  x = rng.standard_normal((300, 12)) @ rng.standard_normal((12, 12)) + 2.0
  xc = x - x.mean(0)
  _, _, vt = np.linalg.svd(xc, full_matrices=False)
  pca = vt[:6].T
  pca = pca * np.sign(pca[np.abs(pca).argmax(0), np.arange(6)])
  v = xc @ pca
  r, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((6, 6)))
  for _ in range(50):
    u, _, wt = np.linalg.svd(np.where(v @ r >= 0, 1.0, -1.0).T @ v)
    r = (u @ wt).T
  for rows in (7, 1000):
    itq = baselines.fit_itq(x, 6, seed=0, method="sliced", rows=rows, directory=str(tmp_path))
    np.testing.assert_allclose(itq.mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(itq.projection, pca @ r, atol=1e-8)
    np.testing.assert_array_equal(itq(x, rows=rows), np.where(xc @ pca @ r >= 0, 1, -1))
  assert list(tmp_path.iterdir()) == []
  # auto: the exact fit (SVD in memory) on small data, the sliced one past the budget.
  exact = baselines.fit_itq(x, 6, seed=0, method="exact").projection
  np.testing.assert_array_equal(baselines.fit_itq(x, 6, seed=0).projection, exact)
  monkeypatch.setattr(baselines, "ITQ_IN_MEMORY_BYTES", x.nbytes - 1)
  np.testing.assert_allclose(baselines.fit_itq(x, 6, seed=0).projection, pca @ r, atol=1e-8)
  with pytest.raises(ValueError, match="ITQ method"):
    baselines.fit_itq(x, 6, method="svd")


def test_kmeans_best_of_n():
  rng = np.random.default_rng(2)
  z = np.concatenate([rng.normal(c, 0.1, (30, 2)) for c in (-3, 0, 3)])
  centres = train_mrhash.kmeans(z, 3, n_init=5, seed=0)
  np.testing.assert_allclose(np.sort(centres[:, 0]), [-3, 0, 3], atol=0.1)


def _write_release(root, n_train=12, n_test=6, classes=3, dims=(7, 5)):
  rng = np.random.default_rng(3)
  (root / "images").mkdir(parents=True)
  for split, n in (("train", n_train), ("test", n_test)):
    lines = []
    for i in range(n):
      c = i % classes
      name = f"images/{split}_{i}.png"
      Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / name)
      lines.append(name + " " + " ".join("1" if k == c else "0" for k in range(classes)))
    (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    for s, d in zip(("msi", "vhr"), dims):
      np.save(root / f"{split}_{s}.npy", rng.standard_normal((n, d)).astype(np.float32))


def test_release_reader(tmp_path):
  _write_release(tmp_path)
  ms = multisource.read_release(str(tmp_path), ["msi", "vhr"])
  assert len(ms.table) == 18 and ms.table.num_classes == 3
  np.testing.assert_array_equal(ms.train_idx, np.arange(12))
  np.testing.assert_array_equal(ms.test_idx, np.arange(12, 18))
  assert [s.shape for s in ms.sources] == [(18, 7), (18, 5)]
  np.testing.assert_array_equal(ms.sources[1][12:], np.load(tmp_path / "test_vhr.npy"))
  np.testing.assert_array_equal(ms.table.labels[:6], [0, 1, 2, 0, 1, 2])
  np.save(tmp_path / "test_vhr.npy", np.zeros((5, 5), np.float32))
  with pytest.raises(ValueError, match=r"test_vhr.npy: expected \[6, D\]"):
    multisource.read_release(str(tmp_path), ["msi", "vhr"])
  (tmp_path / "train.txt").write_text("images/train_0.png 0 1 1\n")
  with pytest.raises(ValueError, match=r"train.txt:1: the label must be one-hot"):
    multisource.read_release(str(tmp_path), ["msi", "vhr"])
  _write_release(tmp_path / "again")
  with pytest.raises(FileNotFoundError, match="feature file train_sar"):
    multisource.read_release(str(tmp_path / "again"), ["msi", "sar"])


def test_release_format_end_to_end(tmp_path):
  _write_release(tmp_path / "rel", n_train=24, n_test=9)
  c = mrhash_config.get_config("tiny")
  c.data.source = f"release:{tmp_path / 'rel'}"
  c.mrhash.image_view = "full"
  res = train_mrhash.train_and_evaluate(c, str(tmp_path / "w"))
  # Random images and features: the reader and the run are what is tested (no mAP bound).
  assert res["num_database"] == 24 and res["num_query"] == 9


def test_coarse_view_is_coarser(tmp_path):
  table = datasets.generate(str(tmp_path), num_classes=2, per_class=1, size=32)
  full = input_pipeline.load_image(table.paths[0], 32)
  coarse = input_pipeline.load_image(multisource.view(table, "coarse4").paths[0], 32, degrade=4)
  # Coarse: less high-frequency energy (neighbouring pixels closer).
  hf = lambda a: np.abs(np.diff(a.astype(float), axis=1)).mean()
  assert hf(coarse) < 0.7 * hf(full)
  with pytest.raises(ValueError, match="coarseN"):
    multisource.view(table, "coarseX")


@pytest.mark.parametrize("preset", ["tiny,best", "tiny,itq"])
def test_cli_tiny(tmp_path, preset):
  cmd = [
    sys.executable,
    "-m",
    "rshash_jax.main",
    f"--config=configs/mrhash.py:{preset}",
    f"--workdir={tmp_path}",
  ]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads((tmp_path / "results.json").read_text())
  assert res["method"] == ("itq" if "itq" in preset else "mrhash")
  for key in ("map", "map_at_r", "precision_at", "pr_curve", "num_database", "num_query"):
    assert key in res
  assert set(res["timing"]) == {"data_and_features_seconds", "train_seconds", "eval_seconds"}


@pytest.mark.parametrize("preset", ["tiny", "tiny,finetune"])
def test_resume_equals_uninterrupted_and_its_encoder_reproduces_its_codes(tmp_path, preset):
  """A run stopped inside both stages and resumed gives the uninterrupted run's results;
  `encode` with its saved encoder (backbone -> L2 norm -> / scale -> hash net) gives the
  codes training evaluated: the same mAP on the same split (fine-tuned backbone included)."""
  from rshash_jax import commands  # pylint: disable=g-import-not-at-top
  from rshash_jax.retrieval import metrics  # pylint: disable=g-import-not-at-top

  c = mrhash_config.get_config(preset)
  c.mrhash.feature_norm = "l2"  # the encoder must redo the normalisation
  full = train_mrhash.train_and_evaluate(c, str(tmp_path / "full"))
  c2 = mrhash_config.get_config(preset)
  c2.mrhash.feature_norm = "l2"
  c2.train.max_steps_per_run = 10  # stage 1 has 12 steps, stage 2 18: stops inside both
  while not (res := train_mrhash.train_and_evaluate(c2, str(tmp_path / "parts"))):
    pass
  for key in ("map", "map_at_r", "pr_curve"):
    assert res[key] == full[key], key
  assert res["mode"] == c.train.mode
  data = res["dataset_description"].split(" in ", 1)[1].split(",")[0]
  out = np.load(commands.encode(str(tmp_path / "parts"), data, str(tmp_path / "codes.npz")))
  tr, te = datasets.split_per_class(out["labels"], c.data.train_ratio, c.data.seed)
  got = metrics.mean_average_precision(
    out["codes"][te], out["codes"][tr], out["labels"][te], out["labels"][tr]
  )
  assert got == pytest.approx(res["map"], abs=1e-6)


def test_feature_norm_choices():
  x = np.array([[3.0, 4.0], [0.0, 2.0]], np.float32)
  np.testing.assert_allclose(
    np.asarray(mrhash.normalize_features(x, "l2")), [[0.6, 0.8], [0.0, 1.0]], rtol=1e-6
  )
  np.testing.assert_array_equal(np.asarray(mrhash.normalize_features(x, "none")), x)
  with pytest.raises(ValueError, match="mrhash.feature_norm"):
    mrhash.normalize_features(x, "l1")


@pytest.mark.parametrize(
  "field,value,message",
  [
    ("mrhash.feature_norm", "l1", "config.mrhash.feature_norm='l1' is invalid"),
    ("train.mode", "sideways", "config.train.mode='sideways' is invalid"),
    ("mrhash.hash_init", "itq", "set model.head_hidden=0"),
    ("mrhash.pair_weight", -1.0, "config.mrhash.pair_weight=-1.0 is invalid"),
    ("mrhash.balance_weight", 1e9, "config.mrhash.balance_weight=1000000000.0 is invalid"),
  ],
)
def test_bad_config_values_are_named(field, value, message):
  from rshash_jax.training import config_checks  # pylint: disable=g-import-not-at-top

  c = mrhash_config.get_config("tiny")
  section, key = field.split(".")
  c[section][key] = value
  with pytest.raises(ValueError, match=message):
    config_checks.check_mrhash(c)


def test_validation_split_never_touches_the_test_part(tmp_path):
  labels = np.repeat(np.arange(3), 20)
  train_idx, test_idx = datasets.split_per_class(labels, 0.8, 0)
  db, val = datasets.validation_split(labels, train_idx, 0.25, 0)
  assert set(db) | set(val) == set(train_idx) and not set(db) & set(val)
  assert np.bincount(labels[val]).tolist() == [4, 4, 4]
  c = mrhash_config.get_config("tiny,itq")
  c.data.validation = 0.25
  res = train_mrhash.train_and_evaluate(c, str(tmp_path / "w"))
  assert res["split"] == "validation" and res["num_query"] == 12 and res["num_database"] == 36
  c.data.validation = 1.0
  with pytest.raises(ValueError, match="config.data.validation=1.0"):
    train_mrhash.train_and_evaluate(c, str(tmp_path / "bad"))


def test_partial_finetune_from_cache_equals_without(tmp_path):
  """train.finetune_from=conv2 trains conv2 and the hash network on tiny_cnn: from the
  cached conv1 activations (4 dihedral views, data.augment off: view 0 only) or with conv1
  run in every step, the same codes; conv1 stays as it was."""
  from rshash_jax.retrieval import encoder  # pylint: disable=g-import-not-at-top

  res, params = {}, {}
  for cache in ("yes", "no"):
    c = mrhash_config.get_config("tiny,finetune")
    c.train.finetune_from, c.train.finetune_cache, c.data.augment = "conv2", cache, False
    c.mrhash.ae_epochs, c.train.epochs = 2, 2
    res[cache] = train_mrhash.train_and_evaluate(c, str(tmp_path / cache))
    params[cache] = encoder.load_encoder(str(tmp_path / cache / "encoder")).variables["params"][
      "backbone"
    ]
  assert os.listdir(tmp_path / "yes" / "cache") != os.listdir(
    tmp_path / "no" / "cache"
  )  # the activation store
  assert res["yes"]["map"] == pytest.approx(res["no"]["map"], abs=1e-6)
  init = backbones.create(
    "tiny_cnn", pretrained=False, image_size=c.model.image_size or None, seed=c.seed
  ).variables["params"]
  for name in ("conv1", "conv2"):
    for cache in params:
      same = all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(init[name]), jax.tree.leaves(params[cache][name]))
      )
      assert same == (name == "conv1"), (cache, name)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
      params["yes"][name],
      params["no"][name],
    )


def test_streamed_kmeans_is_lloyd_as_scipy_runs_it():
  """Chunked Lloyd iterations (models/kmeans.py) from given centres equal scipy's kmeans2
  from the same centres, and the chunked pass equals the in-memory one."""
  from scipy.cluster import vq

  from rshash_jax.models import kmeans as kmeans_lib

  rng = np.random.default_rng(5)
  z = np.concatenate([rng.normal(c, 0.7, (200, 4)) for c in (-2, 0, 1, 3)])
  init = kmeans_lib.plus_plus(z, 6, np.random.default_rng(0))
  ref, _ = vq.kmeans2(z, init.copy(), iter=10, minit="matrix")
  whole = kmeans_lib.lloyd(z, init, 10, chunk=len(z))
  chunked = kmeans_lib.lloyd(z, init, 10, chunk=7)
  np.testing.assert_allclose(whole, ref, rtol=0, atol=1e-10)
  np.testing.assert_allclose(chunked, whole, rtol=0, atol=1e-10)
  # An empty cluster keeps its centre (scipy's missing="warn" does the same).
  far = np.vstack([init[:5], [[100.0] * 4]])
  np.testing.assert_array_equal(kmeans_lib.lloyd(z, far, 3, chunk=50)[5], far[5])
  # Best of n restarts, read through a sample and chunks.
  z3 = np.concatenate([rng.normal(c, 0.1, (300, 2)) for c in (-3, 0, 3)])
  centres = kmeans_lib.kmeans(z3, 3, n_init=4, seed=0, chunk=64, sample=100)
  np.testing.assert_allclose(np.sort(centres[:, 0]), [-3, 0, 3], atol=0.05)
  with pytest.raises(ValueError, match="3 clusters need 1..2 rows"):
    kmeans_lib.kmeans(z3[:2], 3)


def test_initial_centres_exact_and_streamed_and_row_slices(tmp_path):
  """The latents pass in row slices equals one pass; `streamed` k-means over the
  memory-mapped latents is models/kmeans.py's on the same latents, `exact` scipy's, and
  neither leaves a file behind."""
  import ml_collections

  from rshash_jax.models import kmeans as kmeans_lib
  from rshash_jax.parallel import sharding

  mesh = sharding.data_mesh()
  rng = np.random.default_rng(6)
  x = rng.normal(size=(700, 64)).astype(np.float32)
  x[:350] += 3
  mmapped = np.lib.format.open_memmap(
    tmp_path / "x.npy", mode="w+", dtype=np.float32, shape=x.shape
  )
  mmapped[:] = x
  fn = jax.jit(lambda v: v * 2.0)
  np.testing.assert_array_equal(train_mrhash.rows_apply(fn, mmapped, mesh, 64, chunk=96), 2 * x)
  hc = ml_collections.ConfigDict({"num_clusters": 2, "kmeans_n_init": 2, "kmeans": "streamed"})
  streamed = train_mrhash.initial_centres(fn, mmapped, mesh, hc, 0, str(tmp_path / "tmp"))
  np.testing.assert_allclose(streamed, kmeans_lib.kmeans(2 * x, 2, n_init=2, seed=0), atol=1e-6)
  assert os.listdir(tmp_path / "tmp") == []
  hc.kmeans = "exact"
  exact = train_mrhash.initial_centres(fn, mmapped, mesh, hc, 0, str(tmp_path / "tmp"))
  np.testing.assert_allclose(exact, train_mrhash.kmeans(2 * x, 2, 2, 0), atol=1e-6)
  np.testing.assert_allclose(np.sort(exact[:, 0]), np.sort(streamed[:, 0]), atol=1e-3)
