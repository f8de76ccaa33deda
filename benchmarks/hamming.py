"""Exact Hamming top-k: rshash_jax vs numpy brute force vs FAISS IndexBinaryFlat.

    python benchmarks/hamming.py                      # N = 1M, 10M; 32/64/128 bits
    python benchmarks/hamming.py --sizes=100000 --bits=64 --queries=200   # quick look

One run measures all three on the same random codes, checks that they return the
same distances (rshash_jax and numpy also the same indices: FAISS breaks ties its own
way), and prints queries/s and the ratio to FAISS. JAX uses one CPU device per core
(`--devices`, default: all cores), set before JAX starts. numpy brute force is timed
on a subset of queries (`--numpy_queries`) because it is two orders slower.

The memory-bandwidth column is the rate at which a scan that reads the whole
database once per query would run at this machine's measured read bandwidth
(`numpy.sum` over 1 GiB); batched scans reuse each database block for many queries
and so can beat it.
"""

import argparse
import os
import sys
import time


def parse_args():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sizes", default="1000000,10000000", help="database sizes N, comma-separated")
  p.add_argument("--bits", default="32,64,128", help="code lengths, comma-separated")
  p.add_argument("--queries", type=int, default=1000)
  p.add_argument("--k", type=int, default=100)
  p.add_argument("--devices", type=int, default=os.cpu_count(), help="JAX CPU devices (cores)")
  p.add_argument("--numpy_queries", type=int, default=20)
  p.add_argument("--repeats", type=int, default=3, help="best of this many timed runs")
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args()


ARGS = parse_args()
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           f" --xla_force_host_platform_device_count={ARGS.devices}")

import jax  # noqa: E402  (after XLA_FLAGS)
import numpy as np  # noqa: E402

from rshash_jax import hamming  # noqa: E402

try:
  import faiss  # noqa: E402
except ImportError:
  faiss = None


def best_time(fn, repeats):
  best, out = float("inf"), None
  for _ in range(repeats):
    t = time.perf_counter()
    out = fn()
    best = min(best, time.perf_counter() - t)
  return best, out


def random_packed(rng, n, bits):
  words = hamming.num_words(bits)
  x = rng.integers(0, 1 << 32, size=(n, words), dtype=np.uint64).astype(np.uint32)
  if bits % 32:
    x[:, -1] &= np.uint32((1 << (bits % 32)) - 1)
  return x


def numpy_topk(q, db, k):
  dist, idx = [], []
  for row in q:
    d = np.bitwise_count(db ^ row).sum(1, dtype=np.int32)
    part = np.argpartition(d, k - 1)[:k]
    kth = d[part].max()
    cand = np.flatnonzero(d <= kth)  # all ties at the k-th distance, in index order
    order = cand[np.argsort(d[cand], kind="stable")][:k]
    dist.append(d[order])
    idx.append(order)
  return np.stack(dist), np.stack(idx)


def read_bandwidth_gbs():
  a = np.ones(1 << 27, np.float64)  # 1 GiB
  a.sum()
  t, _ = best_time(a.sum, 3)
  return a.nbytes / t / 1e9


def main():
  rng = np.random.default_rng(ARGS.seed)
  bw = read_bandwidth_gbs()
  print(f"devices={jax.device_count()} ({jax.devices()[0].platform}), cores={os.cpu_count()}, "
        f"read bandwidth {bw:.1f} GB/s, Q={ARGS.queries}, k={ARGS.k}, "
        f"faiss={'%s (%d threads)' % (faiss.__version__, faiss.omp_get_max_threads()) if faiss else 'not installed'}")
  header = (f"{'N':>10} {'bits':>4} | {'rshash q/s':>10} {'numpy q/s':>9} {'faiss q/s':>9} | "
            f"{'faiss/rshash':>12} {'scan-bound q/s':>14} | same distances")
  print(header)
  print("-" * len(header))
  for n in (int(s) for s in ARGS.sizes.split(",")):
    for bits in (int(b) for b in ARGS.bits.split(",")):
      db = random_packed(rng, n, bits)
      q = random_packed(rng, ARGS.queries, bits)
      index = hamming.HammingIndex(db)
      index.search(q[:8], ARGS.k)  # compile
      t_jax, (d_jax, i_jax) = best_time(lambda: index.search(q, ARGS.k), ARGS.repeats)
      nq = min(ARGS.numpy_queries, ARGS.queries)
      t_np, (d_np, i_np) = best_time(lambda: numpy_topk(q[:nq], db, ARGS.k), 1)
      same = bool((d_np == d_jax[:nq]).all() and (i_np == i_jax[:nq]).all())
      faiss_qps = float("nan")
      if faiss is not None and bits % 8 == 0:
        as_bytes = lambda x: np.ascontiguousarray(x.astype("<u4")).view(np.uint8)[:, :bits // 8]
        fidx = faiss.IndexBinaryFlat(bits)
        fidx.add(as_bytes(db))
        t_f, (d_f, _) = best_time(lambda: fidx.search(as_bytes(q), ARGS.k), ARGS.repeats)
        faiss_qps = ARGS.queries / t_f
        same = same and bool((d_f == d_jax).all())
        del fidx
      qps = ARGS.queries / t_jax
      bound = bw * 1e9 / (n * db.shape[1] * 4)
      print(f"{n:>10} {bits:>4} | {qps:>10.0f} {nq / t_np:>9.1f} {faiss_qps:>9.0f} | "
            f"{faiss_qps / qps:>12.2f} {bound:>14.0f} | {same}", flush=True)
      del index
  return 0


if __name__ == "__main__":
  sys.exit(main())
