"""Networks and objectives: backbones, DHCNN, MrHash, the shallow baselines, the sign rule.
Pure Flax/JAX; no I/O but reading weights."""
