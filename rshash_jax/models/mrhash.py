"""MrHash (Sun et al., TGRS 2022): unsupervised hashing with multisource pseudo multi-labels.

Stage 1, `MultiSourceAE`: an encoder on source-1 features (D1 -> 512 -> 512 -> 256 -> 256
-> 64, ReLU between, none after the last) and one decoder per source (64 -> 256 -> 256 ->
512 -> 512 -> D_s) trained with MSE(dec_2(z), x_2) + 0.1 MSE(dec_1(z), x_1) (more sources:
every source after the first weighs 1, the first 0.1).

Stage 2: centres mu [C, 64] (the paper: C = 16) from k-means on the AE latents; Student-t
soft assignments (DEC, alpha = 1) q_ij ~ (1 + ||z_i - mu_j||^2)^-1; the target p_ij ~ q_ij^2 / f_j,
f_j = sum_i q_ij, recomputed over the whole training set once per epoch from the feature
branch without gradient. The hash network (features of the single-source image ->
K -> tanh = h; z_img = W_l h, no bias; optionally with the backbone in front, fine-tuned)
is trained with KL(P||Q_img) + KL(P||Q_feat) + 5 (sum of the reconstruction MSEs).
Codes: +1 where h >= 0, else -1. No label is used anywhere.

Options of ours, off by default (the paper's objective has none of them): a pairwise term
that asks the codes' inner products to follow the pseudo multi-labels' similarity, a
quantisation term and a bit-balance term (`stage2_loss`).
"""

from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from rshash_jax import errors

ENCODER_WIDTHS = (512, 512, 256, 256)
LATENT = 64
KL_REDUCTIONS = ("batchmean", "mean")
FEATURE_NORMS = ("l2", "none")


class MLP(nn.Module):
  widths: Sequence[int]
  out: int

  @nn.compact
  def __call__(self, x):
    for i, w in enumerate(self.widths):
      x = nn.relu(nn.Dense(w, name=f"dense{i}")(x))
    return nn.Dense(self.out, name=f"dense{len(self.widths)}")(x)


class MultiSourceAE(nn.Module):
  """Encoder on source 1, one decoder per source. Returns (z, [reconstruction_s])."""

  source_dims: Sequence[int]
  latent: int = LATENT

  def setup(self):
    self.encoder = MLP(ENCODER_WIDTHS, self.latent)
    self.decoders = [
      MLP(tuple(reversed(ENCODER_WIDTHS)), d, name=f"decoder{s}")
      for s, d in enumerate(self.source_dims)
    ]

  def encode(self, x1):
    return self.encoder(x1)

  def __call__(self, x1):
    z = self.encoder(x1)
    return z, [dec(z) for dec in self.decoders]


def reconstruction_loss(recons, sources, first_weight: float = 0.1):
  """sum_s w_s MSE(recon_s, x_s), w_1 = first_weight, the others 1 (the paper: 0.1 and 1)."""
  total = 0.0
  for s, (r, x) in enumerate(zip(recons, sources)):
    total = total + (first_weight if s == 0 else 1.0) * jnp.mean(jnp.square(r - x))
  return total


class HashNet(nn.Module):
  """Single-source image features -> (h = tanh(W f + b) [B, K], z_img = W_l h [B, 64])."""

  bits: int
  hidden: int = 0
  latent: int = LATENT

  @nn.compact
  def __call__(self, f):
    if self.hidden:
      f = nn.relu(nn.Dense(self.hidden, name="hidden")(f))
    h = jnp.tanh(nn.Dense(self.bits, name="hash")(f))
    z = nn.Dense(self.latent, use_bias=False, name="latent")(h)
    return h, z


def image_features(backbone: nn.Module, x, feature_norm: str, scale: float, start: str = ""):
  """Backbone features of preprocessed images (or, with `start`, of the backbone's
  activations at that split point) as the hash network sees them: row normalisation,
  then the training-set scale (fine-tuning and exported encoders)."""
  out = backbone(x, train=False, start=start) if start else backbone(x, train=False)
  f = out["features"].astype(jnp.float32)
  return normalize_features(f, feature_norm) / scale


class MrHash(nn.Module):
  """Everything trained in stage 2: AE, centres, hash network (and, when `backbone` is
  given, the backbone: the hash branch then takes preprocessed images, not features)."""

  source_dims: Sequence[int]
  bits: int
  num_clusters: int = 16
  hidden: int = 0
  backbone: Optional[nn.Module] = None
  feature_norm: str = "none"
  feature_scale: float = 1.0
  backbone_start: str = (
    ""  # partial fine-tuning: the image input is the activation at this split point
  )

  def setup(self):
    self.ae = MultiSourceAE(self.source_dims)
    self.hashnet = HashNet(self.bits, self.hidden)
    self.centres = self.param("centres", nn.initializers.normal(1.0), (self.num_clusters, LATENT))

  def _hash(self, image_input):
    if self.backbone is not None:
      image_input = image_features(
        self.backbone, image_input, self.feature_norm, self.feature_scale, self.backbone_start
      )
    return self.hashnet(image_input)

  def __call__(self, image_input, sources: Sequence[Any]):
    z_feat, recons = self.ae(sources[0])
    h, z_img = self._hash(image_input)
    return dict(
      h=h,
      z_img=z_img,
      z_feat=z_feat,
      recons=recons,
      q_img=soft_assign(z_img, self.centres),
      q_feat=soft_assign(z_feat, self.centres),
    )

  def codes(self, image_input):
    return self._hash(image_input)[0]

  def feature_assign(self, x1):
    return soft_assign(self.ae.encode(x1), self.centres)


def normalize_features(f, how: str):
  """Row-wise feature normalisation before the global RMS scale: "l2" (unit-norm rows) or
  "none" (the paper's unnormalised ResNet-50 features). Works on numpy and traced arrays."""
  if how not in FEATURE_NORMS:
    raise errors.InvalidInput(f"mrhash.feature_norm must be one of {FEATURE_NORMS}, got {how!r}")
  if how == "none":
    return f
  return f / (jnp.linalg.norm(f, axis=-1, keepdims=True) + 1e-12)


def soft_assign(z, centres, alpha: float = 1.0):
  """Student-t soft assignment q_ij ~ (1 + ||z_i - mu_j||^2 / alpha)^(-(alpha + 1) / 2)."""
  d2 = jnp.sum(jnp.square(z[:, None, :] - centres[None, :, :]), axis=-1)
  q = (1.0 + d2 / alpha) ** (-(alpha + 1.0) / 2.0)
  return q / jnp.sum(q, axis=1, keepdims=True)


def target_distribution(q):
  """p_ij ~ q_ij^2 / f_j with f_j = sum_i q_ij, rows normalised (whole training set)."""
  w = jnp.square(q) / jnp.sum(q, axis=0, keepdims=True)
  return w / jnp.sum(w, axis=1, keepdims=True)


def kl_divergence(p, q, reduction: str = "batchmean", eps: float = 1e-12):
  """KL(P||Q) of rows. 'batchmean': sum over clusters, mean over rows (the definition);
  'mean': mean over all rows*clusters elements (the official code; 1/num_clusters of it)."""
  if reduction not in KL_REDUCTIONS:
    raise errors.InvalidInput(
      f"mrhash.kl_reduction must be one of {KL_REDUCTIONS}, got {reduction!r}"
    )
  elem = p * (jnp.log(p + eps) - jnp.log(q + eps))
  return jnp.mean(jnp.sum(elem, axis=1)) if reduction == "batchmean" else jnp.mean(elem)


def pair_term(h, p):
  """Pairwise similarity of the pseudo multi-labels carried into the codes' inner products:
  mean over batch pairs of (h_i . h_j / K - (2 cos(p_i, p_j) - 1))^2. Rows of the target P
  sharing their clusters should get equal codes (inner product K), rows with disjoint
  clusters opposite ones; cosine keeps it a similarity in [0, 1] for soft rows."""
  pn = p / (jnp.linalg.norm(p, axis=1, keepdims=True) + 1e-12)
  target = 2.0 * (pn @ pn.T) - 1.0
  return jnp.mean(jnp.square(h @ h.T / h.shape[1] - target))


def quant_term(h):
  """mean (|h| - 1)^2: tanh outputs pushed to +-1, so the sign loses little."""
  return jnp.mean(jnp.square(jnp.abs(h) - 1.0))


def balance_term(h):
  """mean over bits of (mean over the batch of h_k)^2: each bit +1 on half the images."""
  return jnp.mean(jnp.square(jnp.mean(h, axis=0)))


def stage2_loss(
  out,
  p,
  sources,
  *,
  recon_weight: float = 5.0,
  kl_reduction: str = "batchmean",
  first_source_weight: float = 1.0,
  pair_weight: float = 0.0,
  quant_weight: float = 0.0,
  balance_weight: float = 0.0,
) -> Tuple[Any, dict]:
  """KL(P||Q_img) + KL(P||Q_feat) + recon_weight * (MSE recon 1 + MSE recon 2 + ...), the
  paper's objective; options of ours (0 = off, the default): + pair_weight * pair_term
  + quant_weight * quant_term + balance_weight * balance_term of the codes h."""
  kl_img = kl_divergence(p, out["q_img"], kl_reduction)
  kl_feat = kl_divergence(p, out["q_feat"], kl_reduction)
  recon = reconstruction_loss(out["recons"], sources, first_weight=first_source_weight)
  h = out["h"]
  pair, quant, balance = pair_term(h, p), quant_term(h), balance_term(h)
  loss = kl_img + kl_feat + recon_weight * recon
  loss = loss + pair_weight * pair + quant_weight * quant + balance_weight * balance
  return loss, dict(
    loss=loss, kl_img=kl_img, kl_feat=kl_feat, recon=recon, pair=pair, quant=quant, balance=balance
  )


def stage1_loss(recons, sources):
  loss = reconstruction_loss(recons, sources, first_weight=0.1)
  return loss, dict(loss=loss)


def batched_apply(fn, x, batch: int = 4096):
  """fn over rows of x in slices (bounded memory for whole-training-set passes)."""
  outs = [fn(x[i : i + batch]) for i in range(0, x.shape[0], batch)]
  return jax.tree.map(lambda *a: jnp.concatenate(a), *outs)
