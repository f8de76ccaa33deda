"""Networks and objectives: backbones, DHCNN, MrHash, the shallow baselines. Pure Flax/JAX; no I/O but weights."""
