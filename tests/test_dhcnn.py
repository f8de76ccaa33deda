"""DHCNN loss against independent numpy formulas and finite differences; 1 vs 8 devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rshash_jax.models import dhcnn, signs
from rshash_jax.parallel import sharding
from rshash_jax.training import dhcnn_step, train_state

import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))
import dhcnn as dhcnn_config  # noqa: E402  (configs/dhcnn.py)


def _softplus(x):
  return np.logaddexp(0.0, x)


def numpy_loss(u, logits, labels, rows, bank, bank_labels, eta, beta, scale, num_classes, sgn=None):
  """The reference's formula, written independently (float64)."""
  u, logits, bank = (np.asarray(a, np.float64) for a in (u, logits, bank))
  bank = bank.copy()
  bank[rows] = u
  s = (labels[:, None] == bank_labels[None, :]).astype(np.float64)
  theta = scale * u @ bank.T
  pairwise = np.sum(_softplus(theta) - s * theta)
  sgn = np.where(u >= 0, 1.0, -1.0) if sgn is None else sgn
  quant = np.sum((sgn - u) ** 2)
  logp = logits - logits.max(1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
  ce = -np.mean(logp[np.arange(len(labels)), labels])
  n = bank.shape[0]
  return eta * (pairwise + beta * quant) / (len(u) * n) + (1 - eta) * ce, bank


def _problem(seed=0, b=5, n=12, k=8, c=3):
  rng = np.random.default_rng(seed)
  bank_labels = rng.integers(0, c, n)
  rows = rng.choice(n, b, replace=False)
  labels = bank_labels[rows]
  bank = rng.standard_normal((n, k)).astype(np.float32)
  u = (3 * rng.standard_normal((b, k))).astype(np.float32)
  logits = rng.standard_normal((b, c)).astype(np.float32)
  return u, logits, labels, rows, bank, bank_labels


@pytest.mark.parametrize("scale", [1 / 32, 0.5])
def test_loss_value_matches_numpy(scale):
  u, logits, labels, rows, bank, bank_labels = _problem()
  out = dhcnn.loss_fn(
    jnp.asarray(u),
    jnp.asarray(logits),
    jnp.asarray(labels),
    jnp.asarray(rows),
    jnp.asarray(bank),
    jnp.asarray(bank_labels),
    eta=0.2,
    beta=25.0,
    theta_scale=scale,
    gradient="autodiff",
    ce_to_classifier="scaled",
    num_classes=3,
  )
  want, want_bank = numpy_loss(u, logits, labels, rows, bank, bank_labels, 0.2, 25.0, scale, 3)
  np.testing.assert_allclose(float(out["loss"]), want, rtol=1e-5)
  np.testing.assert_allclose(float(out["reported"]), want, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(out["bank"]), want_bank, rtol=1e-6)


def test_autodiff_gradient_matches_finite_differences():
  u, logits, labels, rows, bank, bank_labels = _problem(1)
  scale, eta, beta = 0.5, 0.3, 2.0
  sgn = np.where(u >= 0, 1.0, -1.0)
  bank_after = bank.astype(np.float64).copy()
  bank_after[rows] = u

  def f_np(uu, ll):  # bank rows and sgn held at their values for u (as the loss treats them)
    b2 = bank_after.copy()
    s = (labels[:, None] == bank_labels[None, :]).astype(np.float64)
    theta = scale * uu @ b2.T
    pw = np.sum(_softplus(theta) - s * theta)
    q = np.sum((sgn - uu) ** 2)
    lp = ll - ll.max(1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(1, keepdims=True))
    return eta * (pw + beta * q) / (len(uu) * len(b2)) + (1 - eta) * -np.mean(
      lp[np.arange(len(labels)), labels]
    )

  def f_jax(uu, ll):
    return dhcnn.loss_fn(
      uu,
      ll,
      jnp.asarray(labels),
      jnp.asarray(rows),
      jnp.asarray(bank),
      jnp.asarray(bank_labels),
      eta=eta,
      beta=beta,
      theta_scale=scale,
      gradient="autodiff",
      ce_to_classifier="scaled",
      num_classes=3,
    )["loss"]

  gu, gl = jax.grad(f_jax, argnums=(0, 1))(jnp.asarray(u), jnp.asarray(logits))
  eps = 1e-4
  u64, l64 = u.astype(np.float64), logits.astype(np.float64)
  for arr, g, which in ((u64, gu, 0), (l64, gl, 1)):
    num = np.zeros_like(arr)
    for idx in np.ndindex(arr.shape):
      plus, minus = arr.copy(), arr.copy()
      plus[idx] += eps
      minus[idx] -= eps
      args_p = (plus, l64) if which == 0 else (u64, plus)
      args_m = (minus, l64) if which == 0 else (u64, minus)
      num[idx] = (f_np(*args_p) - f_np(*args_m)) / (2 * eps)
    np.testing.assert_allclose(np.asarray(g), num, rtol=2e-3, atol=1e-6)


def test_official_gradient_omits_theta_scale():
  u, logits, labels, rows, bank, bank_labels = _problem(2)
  args = (jnp.asarray(labels), jnp.asarray(rows), jnp.asarray(bank), jnp.asarray(bank_labels))

  def pairwise_grad(gradient):
    f = lambda uu: dhcnn.loss_fn(
      uu,
      jnp.asarray(logits),
      *args,
      eta=1.0,
      beta=0.0,
      theta_scale=1 / 32,
      gradient=gradient,
      ce_to_classifier="scaled",
      num_classes=3,
    )["loss"]
    return np.asarray(jax.grad(f)(jnp.asarray(u)))

  np.testing.assert_allclose(pairwise_grad("official"), 32 * pairwise_grad("autodiff"), rtol=1e-5)


def test_full_ce_reaches_classifier_unscaled_and_hash_layer_scaled():
  rng = np.random.default_rng(3)
  head = dhcnn.HashHead(bits=6, num_classes=4)
  f = jnp.asarray(rng.standard_normal((5, 10)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 4, 5))
  params = head.init(jax.random.key(0), f)["params"]
  eta = 0.2

  def ce(p, scale):
    _, logits = head.apply({"params": p}, f, ce_grad_scale=scale)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

  g_full, g_plain = jax.grad(ce)(params, 1 - eta), jax.grad(ce)(params, 1.0)
  np.testing.assert_allclose(
    g_full["classifier"]["kernel"], g_plain["classifier"]["kernel"], rtol=1e-6
  )
  np.testing.assert_allclose(
    g_full["hash"]["kernel"], (1 - eta) * g_plain["hash"]["kernel"], rtol=1e-5
  )


def test_masked_rows_do_not_count():
  u, logits, labels, rows, bank, bank_labels = _problem(4, b=6)
  kw = dict(
    eta=0.2,
    beta=25.0,
    theta_scale=1 / 32,
    gradient="autodiff",
    ce_to_classifier="scaled",
    num_classes=3,
  )
  full = dhcnn.loss_fn(
    *(jnp.asarray(a) for a in (u[:4], logits[:4], labels[:4], rows[:4], bank, bank_labels)), **kw
  )
  masked = dhcnn.loss_fn(
    *(jnp.asarray(a) for a in (u, logits, labels, rows, bank, bank_labels)),
    mask=jnp.asarray([1, 1, 1, 1, 0, 0]),
    **kw,
  )
  np.testing.assert_allclose(float(masked["loss"]), float(full["loss"]), rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(masked["bank"]), np.asarray(full["bank"]))


def test_codes_never_zero():
  np.testing.assert_array_equal(
    np.asarray(signs.signs(jnp.asarray([-1.0, 0.0, 2.0, -0.0]))), [-1, 1, 1, 1]
  )


def test_log_epoch_schedule():
  c = dhcnn_config.get_config()
  sched = train_state.learning_rate_schedule(c.train, steps_per_epoch=7)
  assert np.isclose(sched(0), 1e-2) and np.isclose(sched(6), 1e-2)
  assert np.isclose(sched(7 * 99), 1e-5) and np.isclose(sched(7 * 99 + 6), 1e-5)
  assert np.isclose(sched(7 * 33), 10 ** (-2 - 3 * 33 / 99))


@pytest.mark.parametrize("lr_mults", [None, {"backbone": 0.1}])
def test_grad_clip_applies_with_and_without_lr_multipliers(lr_mults):
  c = dhcnn_config.get_config("tiny").train
  c.optimizer, c.weight_decay, c.grad_clip = "sgd", 0.0, 1.0
  params = {"backbone": jnp.zeros(3), "head": jnp.zeros(4)}
  grads = {"backbone": jnp.full(3, 100.0), "head": jnp.full(4, 100.0)}
  tx = train_state.make_optimizer(c, steps_per_epoch=5, lr_mults=lr_mults)
  updates, _ = tx.update(grads, tx.init(params), params)
  lr = float(train_state.learning_rate_schedule(c, 5)(0))
  # One global norm over both modules, clipped to 1, then each module's rate.
  scale = 1.0 / float(jnp.sqrt(7 * 100.0**2))
  np.testing.assert_allclose(updates["head"], -lr * scale * 100.0, rtol=1e-5)
  np.testing.assert_allclose(
    updates["backbone"], -lr * (lr_mults or {}).get("backbone", 1.0) * scale * 100.0, rtol=1e-5
  )


def test_train_step_same_on_1_and_8_devices():
  """Same global batch, same state: the step's loss and new params agree across meshes."""
  assert jax.device_count() >= 8
  c = dhcnn_config.get_config("tiny")
  rng = np.random.default_rng(5)
  n_train, d, b = 40, 12, 8
  model = dhcnn.DHCNN(backbone=None, bits=c.model.bits, num_classes=3)
  params = jax.device_get(
    {"head": model.init(jax.random.key(0), jnp.zeros((1, d)))["params"]["head"]}
  )
  tx = train_state.make_optimizer(c.train, steps_per_epoch=5)
  bank = rng.standard_normal((n_train, c.model.bits)).astype(np.float32)
  bank_labels = rng.integers(0, 3, n_train)
  batch = {
    "x": rng.standard_normal((b, d)).astype(np.float32),
    "label": bank_labels[:b],
    "row": np.arange(b),
  }
  outs = []
  for n_dev in (1, 8):
    mesh = sharding.data_mesh(jax.devices()[:n_dev])
    state = train_state.TrainState(
      step=np.zeros((), np.int32),
      params=params,
      opt_state=jax.device_get(tx.init(params)),
      constants={},
      extra={"bank": bank},
    )
    state = jax.device_put(state, sharding.replicated(mesh))
    step = dhcnn_step.make_train_step(
      model, tx, c, jax.device_put(bank_labels, sharding.replicated(mesh)), mesh
    )
    gbatch = {k: jax.device_put(v, sharding.sharded_rows(mesh)) for k, v in batch.items()}
    for _ in range(3):
      state, metrics = step(state, gbatch, jax.random.key(0))
    outs.append(
      (jax.device_get(state.params), jax.device_get(state.extra["bank"]), jax.device_get(metrics))
    )
  (p1, b1, m1), (p8, b8, m8) = outs
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), p1, p8)
  np.testing.assert_allclose(b1, b8, rtol=1e-5, atol=1e-7)
  for k in m1:
    np.testing.assert_allclose(m1[k], m8[k], rtol=1e-5)


@pytest.mark.parametrize("classes,bits", [(21, 32), (21, 64), (30, 16), (45, 48)])
def test_hash_centers_are_far_apart(classes, bits):
  """Hadamard rows (and negations) differ in K/2 or K bits; random codes are seeded."""
  t = dhcnn.hash_centers(classes, bits, seed=3)
  assert t.shape == (classes, bits) and set(np.unique(t)) == {-1.0, 1.0}
  d = (bits - t @ t.T) / 2  # Hamming distances
  off = d[~np.eye(classes, dtype=bool)]
  if bits & (bits - 1) == 0 and 2 * bits >= classes:
    assert set(np.unique(off)) <= {bits / 2, bits}
  else:
    assert off.min() > 0 and abs(off.mean() - bits / 2) < 0.1 * bits
    np.testing.assert_array_equal(t, dhcnn.hash_centers(classes, bits, seed=3))


def test_center_term_value_gradient_and_multilabel():
  """center_weight adds w * mean_i ||t_{y_i} - u_i||^2 / K to the loss (numpy formula); a
  multi-hot row takes sign(sum of its labels' targets), tied bits not counted; 0 adds nothing."""
  u, logits, labels, rows, bank, bank_labels = _problem(2, c=3)
  centers = dhcnn.hash_centers(3, 8)
  kw = dict(
    eta=0.2,
    beta=25.0,
    theta_scale=0.5,
    gradient="autodiff",
    ce_to_classifier="scaled",
    num_classes=3,
  )
  args = [jnp.asarray(a) for a in (u, logits, labels, rows, bank, bank_labels)]
  base = dhcnn.loss_fn(*args, **kw)
  out = dhcnn.loss_fn(*args, **kw, centers=jnp.asarray(centers), center_weight=2.0)
  want = np.mean(np.sum((centers[labels] - u) ** 2, axis=1) / 8)
  np.testing.assert_allclose(float(out["center"]), want, rtol=1e-5)
  np.testing.assert_allclose(float(out["loss"]), float(base["loss"]) + 2.0 * want, rtol=1e-5)
  assert float(base["center"]) == 0.0
  g = jax.grad(
    lambda uu: dhcnn.center_term(uu, jnp.asarray(labels), jnp.asarray(centers), jnp.ones(len(u)))
  )(jnp.asarray(u))
  np.testing.assert_allclose(g, 2 * (u - centers[labels]) / (8 * len(u)), rtol=1e-5, atol=1e-7)
  multi = np.array([[1, 1, 0], [0, 0, 1]])  # rows 0 and 1 of Hadamard(8) tie on half the bits
  t = np.sign(multi @ centers)
  got = dhcnn.center_term(jnp.asarray(u[:2]), jnp.asarray(multi), jnp.asarray(centers), jnp.ones(2))
  assert (t[0] == 0).sum() == 4
  np.testing.assert_allclose(
    float(got), np.mean(np.sum(np.abs(t) * (t - u[:2]) ** 2, axis=1) / 8), rtol=1e-5
  )


def test_distill_term_is_one_minus_the_within_class_correlation():
  rng = np.random.default_rng(3)
  b, n, k = 4, 12, 8
  u, bank = rng.normal(size=(b, k)), rng.normal(size=(n, k))
  labels, bank_labels = np.array([0, 1, 0, 2]), rng.integers(0, 3, n)
  bank_labels[[0, 1, 2, 5]] = [0, 0, 1, 0]
  rows = np.array([0, 3, 5, 7])
  ref_sim = rng.uniform(-1, 1, (b, n))
  got = dhcnn.distill_term(
    jnp.asarray(u),
    jnp.asarray(bank),
    dhcnn.similarity(jnp.asarray(labels), jnp.asarray(bank_labels)),
    jnp.asarray(ref_sim),
    jnp.asarray(rows),
    jnp.ones(b),
  )
  per_row = []
  for i in range(b):
    js = [j for j in range(n) if bank_labels[j] == labels[i] and j != rows[i]]
    if len(js) < 2:
      per_row.append(0.0)
      continue
    h = np.tanh(u[i]) @ np.tanh(bank[js]).T / k
    per_row.append(1.0 - np.corrcoef(h, ref_sim[i, js])[0, 1])
  assert float(got) == pytest.approx(np.mean(per_row), rel=1e-5)
  # Its gradient moves u towards codes whose agreement follows the reference.
  g = jax.grad(
    lambda x: dhcnn.distill_term(
      x,
      jnp.asarray(bank),
      dhcnn.similarity(jnp.asarray(labels), jnp.asarray(bank_labels)),
      jnp.asarray(ref_sim),
      jnp.asarray(rows),
      jnp.ones(b),
    )
  )(jnp.asarray(u))
  stepped = jnp.asarray(u) - 0.5 * g
  after = dhcnn.distill_term(
    stepped,
    jnp.asarray(bank),
    dhcnn.similarity(jnp.asarray(labels), jnp.asarray(bank_labels)),
    jnp.asarray(ref_sim),
    jnp.asarray(rows),
    jnp.ones(b),
  )
  assert float(after) < float(got)


def test_listwise_distill_term_is_the_kl_of_the_reference_neighbourhoods():
  rng = np.random.default_rng(4)
  b, n, k, t = 3, 10, 8, 0.1
  u, bank = rng.normal(size=(b, k)), rng.normal(size=(n, k))
  rows, mask = np.array([0, 4, 9]), np.array([1.0, 1.0, 0.0])
  ref_sim = rng.uniform(-1, 1, (b, n))

  def term(x):
    return dhcnn.listwise_distill_term(
      x, jnp.asarray(bank), jnp.asarray(ref_sim), jnp.asarray(rows), jnp.asarray(mask), t
    )

  def softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()

  per_row = []
  for i in range(2):  # row 2 is padding (mask 0)
    js = [j for j in range(n) if j != rows[i]]
    p = softmax(ref_sim[i, js] / t)
    q = softmax(np.tanh(u[i]) @ np.tanh(bank[js]).T / k / t)
    per_row.append(np.sum(p * np.log(p / q)))
  assert float(term(jnp.asarray(u))) == pytest.approx(np.mean(per_row), rel=1e-5)
  # Zero when the codes' agreement is the reference similarity itself.
  ref_codes = np.tanh(u) @ np.tanh(bank).T / k
  same = dhcnn.listwise_distill_term(
    jnp.asarray(u), jnp.asarray(bank), jnp.asarray(ref_codes), jnp.asarray(rows), jnp.ones(b), t
  )
  assert float(same) == pytest.approx(0.0, abs=1e-6)
  # A gradient step lowers it; the padded row gets no gradient.
  g = jax.grad(term)(jnp.asarray(u))
  assert float(term(jnp.asarray(u) - 0.5 * g)) < float(term(jnp.asarray(u)))
  assert np.all(np.asarray(g)[2] == 0)


def test_center_margin_leaves_codes_free_within_the_margin():
  centers = jnp.asarray(dhcnn.hash_centers(2, 8))
  labels, mask = jnp.asarray([0, 0]), jnp.ones(2)
  t = np.asarray(centers[0])
  near = t.copy()
  near[:1] *= -1  # 1 of 8 bits off the target: inside a margin of 0.2
  far = t.copy()
  far[:4] *= -1  # 4 of 8 bits off: outside it
  u = jnp.asarray(np.stack([near, far]) * 20.0)  # saturated: tanh(u) = the signs
  within = dhcnn.center_term(u[:1], labels[:1], centers, mask[:1], margin=0.2)
  beyond = dhcnn.center_term(u[1:], labels[1:], centers, mask[1:], margin=0.2)
  assert float(within) == 0.0
  assert float(beyond) == pytest.approx((4 / 8 - 0.2) ** 2, rel=1e-5)
  # Without a margin the term is the equality pull of before: ||t - u||^2 / K.
  plain = dhcnn.center_term(jnp.asarray(t)[None], labels[:1], centers, mask[:1])
  assert float(plain) == 0.0


def _chosen_overrides(record: str) -> dict:
  with open(os.path.join(REPO, "benchmarks", "results", record)) as f:
    r = json.load(f)["results"]
  return dict(map(tuple, r["grid"]["settings"]))[r["chosen"]]


def _assert_local_with(preset: str, overrides: dict):
  """configs/dhcnn.py:PRESET is `local` on Adam 1e-3 (the base the grids ran on) with
  exactly `overrides`."""
  c, local = dhcnn_config.get_config(preset), dhcnn_config.get_config("local")
  local.train.lr_start = 1e-3
  for key, value in overrides.items():
    block, field = key.split(".")
    local[block][field] = value
  for block in ("data", "model", "train", "features", "eval", "dhcnn"):
    assert c[block].to_dict() == local[block].to_dict(), block


def test_neighbours_preset_is_local_with_the_selected_options():
  """`neighbours` is the setting benchmarks/dhcnn_neighbours.py --grid=listwise chose."""
  overrides = _chosen_overrides("dhcnn_listwise_selection.json")
  assert overrides["dhcnn.distill"] == "listwise"
  # `neighbours` was selected on `local` when it trained with Adam 1e-3; `local` now has 3e-4.
  assert dhcnn_config.get_config("local").train.lr_start == 3e-4
  _assert_local_with("neighbours,bits=32", {"model.bits": 32, **overrides})


def test_best_preset_is_neighbours_on_the_partial_fine_tuning_selected():
  """`best` is the setting benchmarks/dhcnn_neighbours.py --grid=partial chose: partial
  fine-tuning with the listwise overrides."""
  overrides = _chosen_overrides("dhcnn_partial_selection.json")
  assert overrides["train.finetune_from"] == "blocks_15"
  _assert_local_with("best", overrides)
  # `classes` is the preset `best` was before: centres, no distillation.
  old = dhcnn_config.get_config("classes")
  assert (old.dhcnn.center_weight, old.dhcnn.distill_weight) == (1.0, 0.0)
  assert old.train.finetune_from == "blocks_15"
