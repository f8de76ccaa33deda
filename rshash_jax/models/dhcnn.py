"""DHCNN (Song, Li, Benediktsson, TGRS 2021): hash layer + classifier, and its loss.

Model: backbone feature f -> hash layer u = W_h f + v_h (K units, no activation) ->
classifier logits = W_c u + v_c. Codes b = +1 where u >= 0 else -1; the predicted
class is argmax(logits). In frozen mode the backbone is dropped and f comes from cached
features; `head_hidden` optionally puts one ReLU layer between f and the hash layer.

Loss, as the official MatConvNet code optimises it (reference section 1):

  theta_ij = theta_scale * u_i . U_j             U: memory bank [N_train, K]
  pairwise = sum_ij softplus(theta_ij) - S_ij theta_ij      S_ij = same class
  quant    = sum_i ||sgn(u_i) - u_i||^2          sgn(u) held constant
  loss     = eta * (pairwise + beta * quant) / (B * N_train) + (1 - eta) * CE

with two explicit choices (config `dhcnn.*`):
  gradient = "official": d theta / d u is taken as U_j, i.e. without theta_scale, as the
             MatConvNet code does (32x its own loss's gradient at theta_scale 1/32);
             "autodiff": the true gradient of the loss above.
  ce_to_classifier = "full": the classifier layer receives the unscaled CE gradient and
             the hash layer (1 - eta) of it, as in the official code; "scaled": (1 - eta) * CE
             everywhere, a plain weighted sum.
The bank rows of the batch are overwritten with the batch's u (held constant) before the
loss is computed, as DPSH does, so each image also pairs with itself.

Class-wise hash targets (`dhcnn.center_weight` > 0; an extension, off by default: the paper
has none). Each class c gets a target code t_c in {-1, +1}^K (hash_centers: rows of a
Hadamard matrix and their negations when K is a power of 2 and 2K >= C, else seeded random
codes, as CSQ, Yuan et al. CVPR 2020, builds them), and

  loss += center_weight * mean_i ||t_{y_i} - u_i||^2 / K

pulls every image's u onto its class's code, so that the Hamming ranking follows the
classes as the classifier does (targets far apart: K/2 bits for Hadamard rows). Multi-label
images take the sign of the sum of their labels' targets; tied bits are left free. With
`dhcnn.center_margin` = m > 0 the pull is a margin instead of an equality: with
a_i = mean_k t_k tanh(u_ik) (1 at the target, so (1 - a_i) / 2 is the soft fraction of bits
that differ from it),

  loss += center_weight * mean_i relu((1 - a_i) / 2 - m)^2

leaves every code free within m K bits of its class's target (classes K/2 apart stay
apart), so that the order inside a class can follow the images (distill_weight).

Neighbourhood distillation (`dhcnn.distill_weight` > 0; an extension, off by default). The
terms above separate classes and are indifferent to the order inside one: trained to the
end they give every image of a class nearly the same code. With r_ij the cosine of the
reference features (the frozen backbone's, `eval.reference`) of batch image i and
training image j, and h_ij = tanh(u_i) . tanh(U_j) / K the soft code agreement with the
bank (held constant), each batch row i adds

  loss += distill_weight * mean_i (1 - corr_j(h_ij, r_ij))   over j of i's class, j != i

so that inside its class a query's codes stay closer to the images that look like it. A
correlation is indifferent to the level and scale of h, which the class terms set.

With `dhcnn.distill = "listwise"` the term is instead relational distillation over the whole
bank (as CompRess, Abbasi Koohpayegani et al. NeurIPS 2020, distils an embedding's
neighbourhoods): with T = `dhcnn.distill_temperature`, p_i = softmax_j(r_ij / T) and
q_i = softmax_j(h_ij / T) over every bank row j != i, whatever its class,

  loss += distill_weight * mean_i KL(p_i || q_i)

The teacher's mass sits on each image's nearest reference neighbours, so the term asks the
codes to keep those near (the neighbours neighbour recall counts, seen or unseen class),
while the class terms keep the classes apart.

Multi-label data (labels multi-hot [N, C], e.g. from a label file): S_ij = 1 when i and j
share at least one label, and CE becomes the multi-label loss, a sigmoid binary cross
entropy per label averaged over the C labels (BCEWithLogits' mean); each label is
predicted where its logit > 0. (An extension: the paper's data are single-label.)
"""

from typing import Any, Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from rshash_jax import errors
from rshash_jax.models import signs

GRADIENTS = ("official", "autodiff")
CE_MODES = ("full", "scaled")
DISTILL_KINDS = ("class", "listwise")


class HashHead(nn.Module):
  """f -> (u [B, K], logits [B, C]); weights and biases of both layers ~ N(0, 0.01^2)."""

  bits: int
  num_classes: int
  hidden: int = 0
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, f, train: bool = False, ce_grad_scale: float = 1.0):
    init = nn.initializers.normal(0.01)
    h = f.astype(self.dtype)
    if self.hidden:
      h = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, name="hidden")(h))
    if self.dropout:
      h = nn.Dropout(self.dropout, deterministic=not train)(h)
    u = nn.Dense(self.bits, kernel_init=init, bias_init=init, dtype=self.dtype, name="hash")(h)
    u = u.astype(jnp.float32)
    # ce_grad_scale < 1 lets the classifier take the full CE gradient while u receives only
    # that fraction of it (the official code's weighting; see ce_grad_scale()).
    logits = nn.Dense(self.num_classes, kernel_init=init, bias_init=init, name="classifier")(
      _scale_grad(u, ce_grad_scale)
    )
    return u, logits


class DHCNN(nn.Module):
  """Backbone + HashHead. `backbone` is a module returning {'features', ...}; None takes
  features directly (frozen mode over cached features). With backbone_start (partial
  fine-tuning) only the backbone's layers from that split point on are part of the model."""

  backbone: Optional[nn.Module]
  bits: int
  num_classes: int
  hidden: int = 0
  dropout: float = 0.0
  dtype: Any = jnp.float32
  backbone_start: str = (
    ""  # partial fine-tuning: x is the backbone's activation at this split point
  )

  @nn.compact
  def __call__(self, x, train: bool = False, ce_grad_scale: float = 1.0):
    if self.backbone is None:
      f = x
    elif self.backbone_start:
      f = self.backbone(x, train=train, start=self.backbone_start)["features"]
    else:
      f = self.backbone(x, train=train)["features"]
    return HashHead(
      self.bits, self.num_classes, self.hidden, self.dropout, self.dtype, name="head"
    )(f, train, ce_grad_scale)


def _scale_grad(x, scale):
  """Value x, gradient scaled by `scale`."""
  return scale * x + (1.0 - scale) * jax.lax.stop_gradient(x)


def similarity(labels_a, labels_b):
  """S_ij = 1 where a_i and b_j share a class (ids [N] or multi-hot [N, C])."""
  if labels_a.ndim == 1:
    return (labels_a[:, None] == labels_b[None, :]).astype(jnp.float32)
  return (labels_a.astype(jnp.float32) @ labels_b.astype(jnp.float32).T > 0).astype(jnp.float32)


def pairwise_terms(u, bank, s, *, theta_scale: float, gradient: str, mask=None):
  """(sum_ij softplus(theta) - S theta, sum_i ||sgn(u_i) - u_i||^2) over rows with mask 1."""
  if gradient not in GRADIENTS:
    raise errors.InvalidInput(f"dhcnn.gradient must be one of {GRADIENTS}, got {gradient!r}")
  mask = jnp.ones((u.shape[0], 1), u.dtype) if mask is None else mask.astype(u.dtype)[:, None]
  uu = u @ bank.T
  grad_mult = 1.0 if gradient == "official" else theta_scale
  theta = theta_scale * jax.lax.stop_gradient(uu) + grad_mult * (uu - jax.lax.stop_gradient(uu))
  pairwise = jnp.sum(mask * (jax.nn.softplus(theta) - s * theta))
  quant = jnp.sum(mask * jnp.square(jax.lax.stop_gradient(signs.signs(u)) - u))
  return pairwise, quant


def hash_centers(num_classes: int, bits: int, seed: int = 0) -> np.ndarray:
  """[C, K] class target codes in {-1, +1} (CSQ's construction): the rows of the K x K
  Hadamard matrix and of its negation when K is a power of 2 and 2K >= C (any two differ in
  K/2 or K bits), else codes of independent fair random bits drawn from `seed`."""
  if bits & (bits - 1) == 0 and 2 * bits >= num_classes:
    h = scipy.linalg.hadamard(bits).astype(np.float32)
    return np.concatenate([h, -h])[:num_classes]
  rng = np.random.default_rng(seed)
  return np.where(rng.random((num_classes, bits)) < 0.5, -1.0, 1.0).astype(np.float32)


def _masked_mean(per_row, mask):
  """Mean of per_row [B] over the rows with mask 1 (0 when none)."""
  return jnp.sum(per_row * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def center_term(u, labels, centers, mask, margin: float = 0.0):
  """mean over valid rows of ||t - u||^2 / K, t the class target of each row (multi-hot:
  the sign of the sum of its labels' targets, tied bits not counted); with margin > 0,
  relu(soft fraction of bits off the target - margin)^2 (module docstring)."""
  if labels.ndim == 1:
    t = centers[labels]
  else:
    t = jnp.sign(labels.astype(jnp.float32) @ centers)
  if margin:
    agree = jnp.sum(t * jnp.tanh(u), axis=-1) / jnp.maximum(jnp.sum(jnp.abs(t), axis=-1), 1.0)
    per_row = jnp.square(jax.nn.relu((1.0 - agree) / 2.0 - margin))
  else:
    per_row = jnp.mean(jnp.abs(t) * jnp.square(t - u), axis=-1)
  return _masked_mean(per_row, mask)


def _soft_agreement(u, bank):
  """h_ij = tanh(u_i) . tanh(U_j) / K, the bank held constant: [B, N]."""
  return jnp.tanh(u) @ jax.lax.stop_gradient(jnp.tanh(bank)).T / u.shape[-1]


def _other_rows(bank_rows, n: int):
  """[B, N] True where bank row j is not batch row i's own row."""
  return jnp.arange(n)[None, :] != bank_rows[:, None]


def distill_term(u, bank, s, ref_sim, bank_rows, mask):
  """mean over valid rows of 1 - corr_j(tanh(u_i) . tanh(U_j) / K, ref_sim_ij) over the bank
  rows j related to i (s_ij = 1), i's own row left out; rows with fewer than two such
  pairs, or a constant h or r, add 0."""
  h = _soft_agreement(u, bank)
  w = s * _other_rows(bank_rows, bank.shape[0]).astype(jnp.float32)
  n = jnp.sum(w, axis=1, keepdims=True)
  mean = lambda x: jnp.sum(w * x, axis=1, keepdims=True) / jnp.maximum(n, 1.0)
  hc, rc = h - mean(h), ref_sim - mean(ref_sim)
  cov, vh, vr = mean(hc * rc), mean(hc * hc), mean(rc * rc)
  corr = cov / jnp.sqrt(jnp.maximum(vh * vr, 1e-12))
  ok = (n[:, 0] >= 2) & (vh[:, 0] > 1e-12) & (vr[:, 0] > 1e-12)
  return _masked_mean(jnp.where(ok, 1.0 - corr[:, 0], 0.0), mask)


def listwise_distill_term(
  u, bank, ref_sim, bank_rows, mask, temperature: float, s=None, label_boost: float = 0.0
):
  """mean over valid rows of KL(softmax_j(r_ij / T) || softmax_j(h_ij / T)) over every bank
  row j except i's own, h_ij = tanh(u_i) . tanh(U_j) / K (the bank held constant); with
  label_boost = a > 0 the teacher is r_ij + a s_ij (related rows ahead by a)."""
  h = _soft_agreement(u, bank)
  if label_boost:
    ref_sim = ref_sim + label_boost * s
  other = _other_rows(bank_rows, bank.shape[0])
  log_p = jax.nn.log_softmax(jnp.where(other, ref_sim / temperature, -jnp.inf), axis=-1)
  log_q = jax.nn.log_softmax(jnp.where(other, h / temperature, -jnp.inf), axis=-1)
  kl = jnp.sum(jnp.where(other, jnp.exp(log_p) * (log_p - log_q), 0.0), axis=-1)
  return _masked_mean(kl, mask)


def loss_fn(
  u,
  logits,
  labels,
  bank_rows,
  bank,
  bank_labels,
  *,
  eta: float,
  beta: float,
  theta_scale: float,
  gradient: str = "official",
  ce_to_classifier: str = "full",
  num_classes: int,
  mask=None,
  centers=None,
  center_weight: float = 0.0,
  center_margin: float = 0.0,
  ref_sim=None,
  distill_weight: float = 0.0,
  distill: str = "class",
  distill_temperature: float = 0.05,
  distill_label_boost: float = 0.0,
) -> Dict[str, Any]:
  """DHCNN loss of one batch. Returns dict(loss, pairwise, quant, ce, center, bank) where
  `bank` is the memory bank with this batch's rows written (the caller keeps it).

  u [B, K], logits [B, C] (computed from u), labels [B] (or multi-hot), bank_rows [B]
  rows of the batch in the bank [N, K], bank_labels [N]; mask [B] drops padded rows;
  centers [C, K] class targets (hash_centers), used when center_weight > 0; ref_sim [B, N]
  cosines of the batch's reference features with the bank's, used when distill_weight > 0
  by the `distill` term ("class": distill_term, "listwise": listwise_distill_term).
  """
  if ce_to_classifier not in CE_MODES:
    raise errors.InvalidInput(
      f"dhcnn.ce_to_classifier must be one of {CE_MODES}, got {ce_to_classifier!r}"
    )
  mask = jnp.ones((u.shape[0],), jnp.float32) if mask is None else mask.astype(jnp.float32)
  rows = jnp.where(mask > 0, bank_rows, bank.shape[0])  # padded rows write out of bounds: dropped
  bank = bank.at[rows].set(jax.lax.stop_gradient(u), mode="drop")
  s = similarity(labels, bank_labels)
  pairwise, quant = pairwise_terms(
    u, bank, s, theta_scale=theta_scale, gradient=gradient, mask=mask
  )
  n_valid = jnp.maximum(jnp.sum(mask), 1.0)
  norm = n_valid * bank.shape[0]
  if labels.ndim == 1:
    ce_each = -jnp.sum(jax.nn.one_hot(labels, num_classes) * jax.nn.log_softmax(logits), axis=-1)
  else:  # multi-hot: sigmoid cross entropy per label, averaged over labels
    y = labels.astype(jnp.float32)
    ce_each = jnp.mean(jax.nn.softplus(logits) - y * logits, axis=-1)
  ce = jnp.sum(ce_each * mask) / n_valid
  hash_part = (pairwise + beta * quant) / norm
  if ce_to_classifier == "full":
    total = eta * hash_part + ce  # logits were computed from a (1 - eta)-grad-scaled u
  else:
    total = eta * hash_part + (1.0 - eta) * ce
  reported = eta * hash_part + (1.0 - eta) * ce
  center = jnp.zeros((), jnp.float32)
  if center_weight:
    if centers is None:
      raise errors.InvalidInput("dhcnn.center_weight > 0 needs the class targets (hash_centers)")
    center = center_term(u, labels, centers, mask, center_margin)
    total, reported = total + center_weight * center, reported + center_weight * center
  distilled = jnp.zeros((), jnp.float32)
  if distill_weight:
    if ref_sim is None:
      raise errors.InvalidInput("dhcnn.distill_weight > 0 needs the reference similarities")
    if distill == "listwise":
      distilled = listwise_distill_term(
        u, bank, ref_sim, bank_rows, mask, distill_temperature, s, distill_label_boost
      )
    elif distill == "class":
      distilled = distill_term(u, bank, s, ref_sim, bank_rows, mask)
    else:
      raise errors.InvalidInput(f"dhcnn.distill must be one of {DISTILL_KINDS}, got {distill!r}")
    total, reported = total + distill_weight * distilled, reported + distill_weight * distilled
  return dict(
    loss=total,
    reported=reported,
    pairwise=pairwise / norm,
    quant=quant / norm,
    ce=ce,
    center=center,
    distill=distilled,
    bank=bank,
  )


def ce_grad_scale(eta: float, ce_to_classifier: str) -> float:
  """Gradient fraction of CE that reaches u: (1 - eta) in 'full' mode (the loss then adds
  CE unweighted, so the classifier gets all of it), 1 in 'scaled' mode."""
  return 1.0 - eta if ce_to_classifier == "full" else 1.0
