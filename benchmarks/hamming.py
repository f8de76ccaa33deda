"""Exact Hamming top-k: rshash_jax vs FAISS IndexBinaryFlat (and numpy brute force).

    python benchmarks/hamming.py                      # N = 1M, 10M; 32/64/128 bits
    python benchmarks/hamming.py --sizes=100000 --bits=64 --queries=200   # quick look

One run measures all of them on the same codes: uniform random ones and, with --learned,
codes of trained models (a codes file replicated to N, each bit flipped with probability
--flip). rshash_jax and FAISS are timed interleaved (ours, FAISS, ours, FAISS, ...,
`--pairs` pairs, default 5): on a shared machine both drift, so each pair gives one ratio
and the table reports the median ratio (and the medians of each side's q/s). JAX uses one
CPU device per core (`--devices`, default: all cores), FAISS its OpenMP threads (set to
all cores; its compile options are printed and recorded). numpy brute force is timed on
`--numpy_queries` queries only. Exactness: every query of every cell is compared with the
exact top-k in (distance, index) order, from FAISS's own k'-nearest search with k' grown
until its k'-th distance passes ours (numpy's full scan without FAISS), and every timed
repetition must return the same; the run exits 1 if any query differs. --record writes the
cells, with every raw timing, to a JSON record (benchmarks/_record.py) that
docs/performance.md renders.

Roofline columns, from probes measured in the same run (on a GPU the probe is a read of
HBM and FAISS is absent unless installed):
  scan GB/s   the bytes of codes our search reads (Q x N x words x 4: the fused pass
              streams the database once per query) per second; "% bw" is that over a
              read-bandwidth probe (a jitted sum over 1 GiB sharded over every device).
  % popcnt    words XORed and popcounted per second (Q x N x words) over the same
              fused XOR / popcount / group-minimum loop run on codes that stay in L2
              (64K one-word codes per device, 256 queries, the platform's popcount
              form): the one-word rate, so the rest is selection, merging and memory.
              Codes of several words can pass 100%: their per-code work (group
              minimum, mask) is shared by more words, and 128+ bits use uint64 words.
  db GB/s     the database bytes the search must stream from memory: N x words x 4 once
              per batch of --query_batch queries; "% bw" of that is the memory-roofline
              fraction in the usual sense (scan GB/s counts each query's comparisons).

Where the time goes (measured on a 2-core AMD EPYC with AVX2 and no AVX-512, 1M codes,
one core, per query of a 256-query batch, the pieces jitted apart):
  * The fused XOR / popcount / group-minimum pass dominates. Its LLVM IR (XLA_FLAGS=
    --xla_dump_to) is vectorised 256 bits wide, and without AVX-512 VPOPCNTDQ LLVM
    emulates `ctpop.v8i32` with a nibble lookup plus a per-lane horizontal byte sum (~12
    instructions per 8 words): compute-bound, not memory-bound (two processes pinned to
    the two cores run the pass as fast as one). What cut it (hamming._popcount_sum):
    - SWAR counts on uint32 words that stay in 4-bit fields for two words and in bytes
      for up to six, one multiply to sum a code's bytes: 32 bits 316 -> 237 us, 64 bits
      376 -> 327, 128 bits 709 -> 610.
    - From 128 bits up, uint64 words and `population_count` (LLVM's 64-bit lane count
      ends in one vpsadbw; half the lanes to XOR): 128 bits 610 -> ~510 us. jax needs x64
      for uint64, so those searches run in a `jax.enable_x64` scope (thread-local).
      At 64 bits uint64 loses to SWAR (391 against 327 us).
    - Padding masked per group (the groups past the database's end, and the one group it
      cuts recomputed with the item mask) instead of a compare-and-select per code: full
      search, 1M codes, 2 devices, 32 bits +12%, 64 and 128 bits +7%.
  * Selection. It was float32 top_k in two levels over the group minima (512 super-group
    minima, then 3,200 groups) and once over the k x 32 candidates: XLA:CPU's top_k is
    mostly a fixed cost per row at k = 100 (256 rows, one core, per row: 16 us on 512
    keys, 32 us on 3,200, 64 us on 16,384; a full sort of 3,200 costs 521 us). Distances
    are small integers, so now every level counts (hamming._select_first): the k-th
    smallest value by bisection on counts, each level's bracket given by the one before
    (few passes), then bit masks of the positions below it and of the first ties, read
    out by a binary search on running counts. Trace of one device (both cores), 500K x
    128 bits, 256 queries: the three top_k calls took 93-95 us/query and everything but
    the pass 128-133; with counting, everything but the pass takes 80-103 (the rest is
    the candidates' gather, the group-key gather and the masks). Interleaved against the
    top_k version in one run (2 devices, 5 pairs, median): 1M codes 1.28x / 1.20x / 1.10x
    at 32 / 64 / 128 bits, 10M x 128 bits 1.14x; at k = 1000 (the metrics' top-k), 64
    bits: 100K codes 2.04x, 2,100 codes 1.76x. Two traps on the way: unrolled, the
    position search's arithmetic was fused by XLA into the gathers that use it and
    recomputed per gathered element (32 per group; slower than top_k), so it is a loop;
    and the final sort by (distance, index) is one int32 key (XLA:CPU sorts a single
    integer operand with a plain comparison: 256 rows of 100, 2.6 us a row against 11.4
    for the stable two-operand sort). Measured with top_k, and kept: super-groups of 16
    or 64 and groups of 16 were no faster (groups of 16 slow the pass 2.7x).
  * Chunks: smaller chunks pay the selection more often, larger ones fall out of the
    shared last-level cache (32 MiB here, both devices' chunks in it). Interleaved, 10M
    codes, 2 devices: at 128 bits 2^19 codes (8 MiB) ran 1.09x 2^20 and 2^21 0.69x; at 32
    and 64 bits 2^19 ran 0.84-0.86x 2^20. HammingIndex's CPU default caps a chunk at 8 MiB.
    Tiling the pass so a 1-4 MiB block serves all 256 queries before the next (output
    reordered) was slower (172-187 against 221 q/s at 10M x 128 bits).
  * Formulations that should need fewer instructions are compiled worse by XLA:CPU:
    byte planes (uint8 XOR + popcount, sums in uint8) 7-30x slower; the group minimum
    over a major axis (the vectorisable layout) 3-20x slower: both stop the fusion.
  * What helped earlier: the group minimum as uint8 instead of an index-carrying int32 key
    (the key was redundant: groups are contiguous, so group order is index order):
    1M x 64 bits 2209 -> 2749 q/s, 128 bits 1491 -> 1585 q/s (2 cores, best of 3).
  * Tried and dropped: a bit-sliced database (bit b of 32 consecutive codes in one
    word, so one XOR handles 256 codes per AVX2 op and distances are summed by
    carry-save adder trees, ~3 ops per code at 128 bits against ~8 for the lookup
    popcount). XLA fuses it into one loop, but LLVM schedules the adder tree
    breadth-first and spills: 1561-1948 instructions per 256 codes, 340-520 of them
    spill stores, whatever the tree's shape (Wallace, Harley-Seal, recursive halving;
    LLVM's `-pre-RA-sched=source` / `-enable-misched=false` change nothing). The
    group-minimum pass ran 0.91x (32 bits), 0.49-0.54x (64) and 0.48-0.53x (128) of
    the lookup-popcount pass of the time (262,144 codes, 256 queries, one device).
FAISS's IndexBinaryFlat uses scalar 64-bit popcnt, one instruction per 64 bits. On a CPU
with AVX-512 VPOPCNTDQ, LLVM's uint64 lane count is one instruction per 8 words, so the
128-bit path should gain most there (not measured: this machine lacks it).

On an H100 (jax 0.11.2), 100M codes: 2,007-2,933 q/s for Q = 1000 at 128..32 bits, the
database streamed at 5-13 GB/s of a 2,254 GB/s read probe (it is read once per query
batch, so memory is not the limit); Q = 16 reads it at 54-91 GB/s. Query batches of 256
or 1024 and chunks of 1M to 16M codes changed the rate by 8% at most: the fused pass and
the per-chunk selection loop bound it, and a GPU-specific selection is not written yet.
    python benchmarks/hamming.py --sizes=100000000 --queries=1000 --pairs=3 --numpy_queries=1
Those GPU figures predate the counting selection (they used top_k) and were not measured
again: no GPU was lent since. Its bisection is a while loop whose condition a GPU reads
back each step, so re-measure there before quoting them for the current code.
"""

import argparse
import os
import sys
import time

import _record  # the commit measured is read now, at the start (START_COMMIT)


def parse_args():
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--sizes", default="1000000,10000000", help="database sizes N, comma-separated")
  p.add_argument("--bits", default="32,64,128", help="code lengths, comma-separated")
  p.add_argument("--queries", type=int, default=1000)
  p.add_argument("--k", type=int, default=100)
  p.add_argument("--devices", type=int, default=os.cpu_count(), help="JAX CPU devices (cores)")
  p.add_argument("--numpy_queries", type=int, default=20)
  p.add_argument(
    "--pairs", type=int, default=5, help="interleaved (rshash_jax, FAISS) timing pairs"
  )
  p.add_argument(
    "--query_batch", type=int, default=256, help="queries per pass over the database (search's)"
  )
  p.add_argument(
    "--chunk_size",
    type=int,
    default=None,
    help="HammingIndex's database chunk per device (default: HammingIndex's)",
  )
  p.add_argument(
    "--engine",
    default="auto",
    choices=("auto", "popcount", "matmul"),
    help="HammingIndex's engine: popcount, matmul (+-1 matrix products, for GPUs' tensor "
    "cores and TPUs' matrix units) or auto (matmul on accelerators for batches >= 64)",
  )
  p.add_argument("--seed", type=int, default=0)
  p.add_argument(
    "--learned",
    default=None,
    help="also time learned codes: a codes file written by `rshash_jax.main encode`, with "
    "{bits} in its name for each --bits (e.g. /tmp/ucm_codes{bits}.npz); its codes are "
    "replicated to N with --flip bit flips per copy, queries drawn from them the same way",
  )
  p.add_argument(
    "--flip",
    type=float,
    default=0.05,
    help="probability that a replicated learned code has each bit flipped",
  )
  p.add_argument(
    "--multi_index",
    action="store_true",
    help="also time multi-index hashing (rshash_jax/retrieval/multi_index.py) and FAISS's "
    "IndexBinaryMultiHash, interleaved with the scans; every query checked against the scan",
  )
  p.add_argument("--record", default=None, help="write a JSON record here (benchmarks/_record.py)")
  return p.parse_args()


ARGS = parse_args()
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={ARGS.devices}"
)

import jax  # noqa: E402  (after XLA_FLAGS)
import numpy as np  # noqa: E402

from rshash_jax.retrieval import hamming, multi_index  # noqa: E402

try:
  import faiss  # noqa: E402
except ImportError:
  faiss = None


def timed(fn):
  t = time.perf_counter()
  out = fn()
  return time.perf_counter() - t, out


def best_time(fn, repeats):
  best, out = float("inf"), None
  for _ in range(repeats):
    t, out = timed(fn)
    best = min(best, t)
  return best, out


def random_packed(rng, n, bits):
  words = hamming.num_words(bits)
  x = rng.integers(0, 1 << 32, size=(n, words), dtype=np.uint64).astype(np.uint32)
  if bits % 32:
    x[:, -1] &= np.uint32((1 << (bits % 32)) - 1)
  return x


def learned_packed(rng, path, n, bits, flip):
  """`n` codes drawn (with replacement) from a codes file's, each bit flipped with
  probability `flip`: an archive of `n` scenes whose codes are distributed as the trained
  model's, not uniformly (duplicates, skewed bits, class clusters)."""
  from rshash_jax.retrieval import codes as codes_lib  # pylint: disable=g-import-not-at-top

  z = codes_lib.load_codes(path)
  if int(z["bits"]) != bits:
    raise SystemExit(f"{path} holds {int(z['bits'])}-bit codes, not {bits}")
  signs = hamming.unpack_codes(np.asarray(z["codes"]), bits) > 0  # {-1, +1} -> bits
  out = np.empty((n, hamming.num_words(bits)), np.uint32)
  for lo in range(0, n, 1 << 18):  # in blocks: the flip mask is a byte per bit
    rows = signs[rng.integers(0, len(signs), min(n - lo, 1 << 18))]
    rows ^= rng.random(rows.shape, dtype=np.float32) < flip
    out[lo : lo + len(rows)] = hamming.pack_codes(rows.astype(np.uint8), binary=True)
  return out


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


def check_exact(q, db, d, i, k, fidx, as_bytes):
  """Number of queries whose (distances, indices) differ from the exact top-k in
  (distance, index) order. The reference is FAISS's own k'-nearest search with k' large
  enough that its k'-th distance exceeds our k-th (so every tie at our k-th distance is
  among its results: k' grows 4x for the queries where it is not), sorted by (distance,
  index); numpy's full scan without FAISS."""
  if fidx is None:
    bad = 0
    for lo in range(0, len(q), 64):
      dn, inn = numpy_topk(q[lo : lo + 64], db, k)
      bad += int(np.sum(~((dn == d[lo : lo + 64]) & (inn == i[lo : lo + 64])).all(1)))
    return bad
  bad, todo, kk, n = 0, np.arange(len(q)), 2 * k, len(db)
  while len(todo):
    kk = min(kk, n)
    dist, ids = fidx.search(as_bytes(q[todo]), kk)
    done = (dist[:, -1] > d[todo, -1]) | (kk == n)
    for r in np.flatnonzero(done):
      order = np.lexsort((ids[r], dist[r]))[:k]
      qi = todo[r]
      bad += int(not ((dist[r][order] == d[qi]).all() and (ids[r][order] == i[qi]).all()))
    todo, kk = todo[~done], 4 * kk
  return bad


def _sharded(x):
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from rshash_jax.parallel import sharding  # pylint: disable=g-import-not-at-top

  mesh = sharding.data_mesh()
  return jax.device_put(x, NamedSharding(mesh, P(sharding.DATA_AXIS))), mesh.devices.size


def read_bandwidth_gbs():
  """A jitted sum over 1 GiB of uint32 sharded over every device: all cores loading."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  x, _ = _sharded(np.ones(1 << 28, np.uint32))
  fn = jax.jit(lambda a: jnp.sum(a, dtype=jnp.uint32))
  fn(x).block_until_ready()
  t, _ = best_time(lambda: fn(x).block_until_ready(), 3)
  return x.nbytes / t / 1e9


def _probe_seconds(body, q, db) -> float:
  """Best of 3 of body(q, db shard) on every device (shard_map over the data mesh, jitted,
  compiled first)."""
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from rshash_jax.parallel import sharding  # pylint: disable=g-import-not-at-top

  fn = jax.jit(
    jax.shard_map(
      body,
      mesh=sharding.data_mesh(),
      in_specs=(P(), P(sharding.DATA_AXIS)),
      out_specs=P(sharding.DATA_AXIS),
      check_vma=False,
    )
  )
  fn(q, db).block_until_ready()
  t, _ = best_time(lambda: fn(q, db).block_until_ready(), 3)
  return t


def popcount_words_per_s():
  """The search's own fused XOR + popcount + group-minimum pass (one uint32 word per
  code, 256 queries, the platform's popcount form) over 64K codes per device, which
  stay in L2: our best per word here."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  db, n_dev = _sharded(
    rng.integers(0, 1 << 32, (65536 * len(jax.devices()),), dtype=np.uint64).astype(np.uint32)
  )
  q = jnp.asarray(rng.integers(0, 1 << 32, (256, 1), dtype=np.uint64).astype(np.uint32))
  reps = 16

  def body(q, db):
    def one(i, acc):
      d = hamming._popcount_sum(
        [((q + i.astype(jnp.uint32))[:, :, None], db.reshape(1, -1, 32))],
        hamming.use_swar(jax.devices()[0].platform),
      )
      return acc + jnp.min(d, axis=-1).sum()

    return jax.lax.fori_loop(0, reps, one, jnp.int32(0))[None]

  return 256 * db.size * reps / _probe_seconds(body, q, db)


def matmul_ops_per_s():
  """The matrix unit's rate for the matmul engine's own product: 256 +-1 queries of 128
  bits against 64K codes per device, in the platform's matmul dtype (int8 -> int32, bf16
  on TPUs), multiply-adds per second (the probe of its roofline)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  dtype = hamming.matmul_dtype(jax.devices()[0].platform)
  acc = jnp.float32 if dtype == jnp.bfloat16 else jnp.int32
  rng = np.random.default_rng(0)
  x, _ = _sharded(np.where(rng.random((65536 * len(jax.devices()), 128)) < 0.5, 1, -1))
  x = x.astype(dtype)
  q = jnp.asarray(np.where(rng.random((256, 128)) < 0.5, 1, -1), dtype)
  reps = 4

  def body(q, x):
    def one(i, s):
      d = jax.lax.dot_general(q, x, (((1,), (1,)), ((), ())), preferred_element_type=acc)
      return s + jnp.min(d + i.astype(acc), axis=-1).sum().astype(jnp.float32)

    return jax.lax.fori_loop(0, reps, one, jnp.float32(0))[None]

  return 256 * x.size * reps / _probe_seconds(body, q, x)


def main():
  rng = np.random.default_rng(ARGS.seed)
  if faiss is not None:
    faiss.omp_set_num_threads(os.cpu_count())  # FAISS as its users run it: every core
  bw = read_bandwidth_gbs()
  pc = popcount_words_per_s()
  on_accelerator = jax.devices()[0].platform != "cpu"
  mm = (
    matmul_ops_per_s()
    if ARGS.engine == "matmul" or (ARGS.engine == "auto" and on_accelerator)
    else None
  )
  print(
    f"devices={jax.device_count()} ({jax.devices()[0].platform}), cores={os.cpu_count()}, "
    f"read bandwidth {bw:.1f} GB/s, popcount {pc / 1e9:.2f} G words/s, "
    + (f"matmul {mm / 1e12:.3f} T multiply-adds/s, " if mm else "")
    + f"engine {ARGS.engine}, Q={ARGS.queries}, "
    f"k={ARGS.k}, faiss="
    + (
      f"{faiss.__version__} ({faiss.omp_get_max_threads()} threads, {faiss.get_compile_options()})"
      if faiss
      else "not installed"
    )
  )
  header = (
    f"{'codes':>7} {'N':>10} {'bits':>4} | {'rshash q/s':>10} {'faiss q/s':>9} "
    f"{'numpy q/s':>9} | {'rshash/faiss':>12} {'(min..max)':>11} | {'scan GB/s':>9} "
    f"{'% bw':>5} {'% popcnt':>8} | {'db GB/s':>7} {'% bw':>5} | inexact"
  )
  print(header)
  print("-" * len(header))
  kinds = ["random"] + (["learned"] if ARGS.learned else [])
  cells = []
  for n in (int(s) for s in ARGS.sizes.split(",")):
    for bits in (int(b) for b in ARGS.bits.split(",")):
      for kind in kinds:
        if kind == "random":
          db = random_packed(rng, n, bits)
          q = random_packed(rng, ARGS.queries, bits)
        else:
          path = ARGS.learned.format(bits=bits)
          db = learned_packed(rng, path, n, bits, ARGS.flip)
          q = learned_packed(rng, path, ARGS.queries, bits, ARGS.flip)
        cells.append(run_cell(kind, n, bits, db, q, bw, pc, mm))
        db = None  # free the database before the next cell
  if ARGS.record:
    _record.write(
      ARGS.record,
      {
        "queries": ARGS.queries,
        "k": ARGS.k,
        "devices": jax.device_count(),
        "platform": jax.devices()[0].platform,
        "pairs": ARGS.pairs,
        "query_batch": ARGS.query_batch,
        "flip": ARGS.flip if ARGS.learned else None,
        "learned": ARGS.learned,
        "multi_index": ARGS.multi_index,
        "read_bandwidth_gbs": bw,
        "popcount_words_per_s": pc,
        "engine": ARGS.engine,
        "matmul_ops_per_s": mm,
        "cells": cells,
      },
    )
  bad = sum(
    c["inexact_queries"] + (c["multi_index"]["inexact_queries"] if "multi_index" in c else 0)
    for c in cells
  )
  if bad:
    print(f"NOT EXACT: {bad} queries differ from the reference")
    return 1
  return 0


def run_cell(kind, n, bits, db, q, bw, pc, mm=None) -> dict:
  """One timed cell: ours and FAISS interleaved, then every query checked exactly."""
  index = hamming.HammingIndex(db, chunk_size=ARGS.chunk_size, engine=ARGS.engine)
  index.search(q[: ARGS.query_batch], ARGS.k, query_batch=ARGS.query_batch)  # compile it
  nq = min(ARGS.numpy_queries, ARGS.queries)
  t_np, _ = timed(lambda: numpy_topk(q[:nq], db, ARGS.k))
  fidx = None

  def as_bytes(x):
    return np.ascontiguousarray(x.astype("<u4")).view(np.uint8)[:, : bits // 8]

  if faiss is not None and bits % 8 == 0:
    fidx = faiss.IndexBinaryFlat(bits)
    fidx.add(as_bytes(db))
  ours, theirs, results = [], [], []
  for _ in range(ARGS.pairs):  # interleaved: ours, FAISS, ours, FAISS, ...
    t_jax, out = timed(lambda: index.search(q, ARGS.k, query_batch=ARGS.query_batch))
    ours.append(t_jax)
    results.append(out)
    if fidx is not None:
      t_f, (d_f, _) = timed(lambda: fidx.search(as_bytes(q), ARGS.k))
      theirs.append(t_f)
  d_jax, i_jax = (np.asarray(a) for a in results[0])
  # Every timed search returned the same; the first is checked against the reference.
  inexact = check_exact(q, db, d_jax, i_jax, ARGS.k, fidx, as_bytes)
  for d, i in results[1:]:
    inexact += int(np.sum(~((np.asarray(d) == d_jax) & (np.asarray(i) == i_jax)).all(1)))
  ratios = np.asarray(theirs) / np.asarray(ours[: len(theirs)]) if theirs else None
  t_ours = float(np.median(ours))
  scanned = ARGS.queries * n * db.shape[1]  # words XORed and popcounted
  streamed = -(-ARGS.queries // ARGS.query_batch) * n * db.shape[1] * 4  # database bytes read
  faiss_qps = ARGS.queries / float(np.median(theirs)) if theirs else float("nan")
  cell = {
    "codes": kind,
    "n": n,
    "bits": bits,
    "ours_s": _spread(ours),
    "faiss_s": _spread(theirs) if theirs else None,
    "ratio": _spread(ratios) if ratios is not None else None,
    "ours_qps": ARGS.queries / t_ours,
    "faiss_qps": faiss_qps if theirs else None,
    "numpy_qps": nq / t_np,
    "numpy_queries": nq,
    "scan_gbs": scanned * 4 / t_ours / 1e9,
    "scan_pct_bw": 100 * scanned * 4 / t_ours / 1e9 / bw,
    "pct_popcount": 100 * scanned / t_ours / pc,
    "engine": index.engine_for(ARGS.query_batch),
    # matmul engine: multiply-adds (Q x N x stored bits) per second over the probe's rate
    "pct_matmul": 100 * scanned * 32 / t_ours / mm if mm else None,
    "db_gbs": streamed / t_ours / 1e9,
    "checked_queries": ARGS.queries,
    "reference": "faiss range_search" if fidx is not None else "numpy",
    "inexact_queries": inexact,
    "mean_kth_distance": float(d_jax[:, -1].mean()),
    "distinct_db_codes": int(len(np.unique(db, axis=0))) if n <= 2_000_000 else None,
  }
  if ARGS.multi_index:
    cell["multi_index"] = run_multi_index(bits, db, q, d_jax, i_jax, ours, as_bytes)
  rr = f"{ratios.min():.2f}..{ratios.max():.2f}" if ratios is not None else ""
  print(
    f"{kind:>7} {n:>10} {bits:>4} | {cell['ours_qps']:>10.0f} {faiss_qps:>9.0f} "
    f"{nq / t_np:>9.1f} | {np.median(ratios) if ratios is not None else np.nan:>12.2f} "
    f"{rr:>11} | {cell['scan_gbs']:>9.1f} {cell['scan_pct_bw']:>5.0f} "
    f"{cell['pct_popcount']:>8.0f} | {cell['db_gbs']:>7.1f} {100 * cell['db_gbs'] / bw:>5.0f} "
    f"| {inexact}"
    + (f" | {cell['pct_matmul']:.0f}% of the matmul probe" if cell["pct_matmul"] else ""),
    flush=True,
  )
  return cell


def run_multi_index(bits, db, q, d_scan, i_scan, scan_s, as_bytes) -> dict:
  """Multi-index hashing against the scan (same queries, same k) and FAISS's multi-hash.

  FAISS's IndexBinaryMultiHash probes each table up to `nflip` bit flips and ranks what
  it finds: exact only when nflip reaches the k-th distance's substring radius. It runs
  with the same number of tables and substring length as ours and, as its users tune it,
  the smallest nflip in 0..4 whose distances are exact on every query (else 4), with the
  share of queries it gets exact recorded.
  """
  k = ARGS.k
  t0 = time.perf_counter()
  mi = multi_index.MultiIndex(db, bits=bits)
  build_s = time.perf_counter() - t0
  m = len(mi.parts)
  sub = bits // m
  fmh, f_build, nflip, f_exact = None, None, None, None
  if faiss is not None and bits % 8 == 0:
    t0 = time.perf_counter()
    fmh = faiss.IndexBinaryMultiHash(bits, m, sub)
    fmh.add(as_bytes(db))
    f_build = time.perf_counter() - t0
    for nflip in range(5):
      fmh.nflip = nflip
      df, _ = fmh.search(as_bytes(q), k)
      f_exact = int(np.sum((df == d_scan).all(1)))
      if f_exact == len(q):
        break
  mi.search(q, k, query_batch=ARGS.query_batch)  # warm-up: builds and compiles the scan it may use
  ours, theirs, results = [], [], []
  for _ in range(ARGS.pairs):  # interleaved: ours, FAISS's multi-hash, ...
    t, out = timed(lambda: mi.search(q, k, query_batch=ARGS.query_batch))
    ours.append(t)
    results.append(out)
    if fmh is not None:
      theirs.append(timed(lambda: fmh.search(as_bytes(q), k))[0])
  inexact = sum(
    int(np.sum(~((d == d_scan) & (i == i_scan)).all(1))) for d, i in results
  )  # against the scan, itself checked against FAISS's flat index
  res = {
    "substrings": m,
    "build_s": build_s,
    "table_bytes": mi.nbytes(),
    "s": _spread(ours),
    "qps": len(q) / float(np.median(ours)),
    "vs_scan": _spread(np.median(scan_s) / np.asarray(ours)),
    "inexact_queries": inexact,
    "scan_share": mi.scanned_queries / (len(q) * (len(ours) + 1)),  # runs + warm-up
    "faiss_multihash": None,
  }
  if fmh is not None:
    res["faiss_multihash"] = {
      "nflip": nflip,
      "exact_queries": f_exact,
      "build_s": f_build,
      "s": _spread(theirs),
      "qps": len(q) / float(np.median(theirs)),
      "ratio": _spread(np.asarray(theirs) / np.asarray(ours)),
    }
  fm = res["faiss_multihash"]
  print(
    f"        multi-index: m={m} build {build_s:.1f} s, {res['qps']:.0f} q/s, "
    f"{res['vs_scan']['median']:.2f}x the scan, {100 * res['scan_share']:.0f}% of queries to it"
    + (
      f"; FAISS multi-hash nflip={fm['nflip']} ({fm['exact_queries']}/{len(q)} exact) "
      f"{fm['qps']:.0f} q/s, ours/FAISS {fm['ratio']['median']:.2f}x"
      if fm
      else ""
    )
    + f" | {inexact}",
    flush=True,
  )
  return res


def _spread(v):
  return _record.spread(v)


if __name__ == "__main__":
  sys.exit(main())
