"""rshash_jax: deep hashing for remote-sensing image retrieval in JAX/Flax."""


def load_encoder(path, devices=None):
  """Restores an exported (or a training workdir's) encoder; see rshash_jax.encoder."""
  from rshash_jax.retrieval import encoder  # pylint: disable=g-import-not-at-top  (keeps `import rshash_jax` light)

  return encoder.load_encoder(path, devices)
