"""The search service under load: requests/s and p50/p99 latency of single-image queries.

    python benchmarks/serve.py --encoder=/tmp/ucm64 --images=../shared/data/ucmerced
    python benchmarks/serve.py --encoder=/tmp/ucm64 --images=../shared/data/ucmerced \
        --clients=1,8 --requests=400

Starts the real `python -m rshash_jax.main serve` on 127.0.0.1 (a free port) over a codes
file of --num_codes rows (default 100,000): the encoder's codes of the first 256 images of
--images, then random codes (the rows a larger archive would add; the scan costs the same).
Then 1 and 8 clients (threads, one keep-alive connection each) upload archive images
(multipart, k=10) until --requests requests are answered, all on localhost; every
response is checked (200, k hits). Prints one row per client count: requests/s, p50 and
p99 latency (client-side, upload to parsed answer), then the rows as JSON. Without --encoder it
trains configs/dhcnn.py:tiny on generated data first (seconds): a tiny model measures
the service and the Hamming scan more than the network.

    python benchmarks/serve.py --hostile --record=benchmarks/results/serve_hostile.json

--hostile then measures the normal queries (4 clients) twice, alone and beside a hostile
mix: 200 slow connections from other loopback addresses (127.0.0.2-9) that send half a
request and stall (reconnecting when closed), 2 clients uploading decompression bombs
(an 8000 x 8000 PNG, 187 KB -> 183 MB, refused 413 from its header) and one uploading
large-but-allowed images (3000 x 3000 PNG, 26 MB decoded). Reports the normal queries'
p50/p95, the server's peak RSS (VmHWM) and its RSS after the mix; --record writes it all
with the command, commit, date and host.
"""

import argparse
import concurrent.futures
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading

import _record  # the commit measured is read now, at the start (START_COMMIT)
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _codes_file(encoder_path: str, image_paths, num_codes: int, out: str):
  from rshash_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from rshash_jax.retrieval import codes as codes_lib, encoder as encoder_lib, hamming  # pylint: disable=g-import-not-at-top

  enc = encoder_lib.load_encoder(encoder_path)
  real = image_paths[:256]
  imgs = np.stack(
    [input_pipeline.load_image(p, enc.image_size, degrade=enc.meta.get("degrade", 1)) for p in real]
  )
  codes = np.concatenate([enc.encode(imgs[i : i + 64])["codes"] for i in range(0, len(imgs), 64)])
  rng = np.random.default_rng(0)
  extra = rng.integers(
    0, 2**32, (num_codes - len(codes), hamming.num_words(enc.bits)), dtype=np.uint64
  )
  all_codes = np.concatenate([codes, extra.astype(np.uint32)])
  paths = np.asarray([real[i % len(real)] for i in range(num_codes)])
  np.savez(
    out,
    format=codes_lib.FORMAT,
    codes=all_codes,
    ids=np.arange(num_codes),
    labels=np.full(num_codes, -1),
    predicted=np.full(num_codes, -1),
    paths=paths,
    class_names=np.asarray([], dtype=str),
    bits=enc.bits,
    identity=enc.identity,
    method=enc.meta["method"],
    backbone=enc.meta["backbone"],
  )
  return enc


def _proc_kb(pid: int, field: str) -> int:
  with open(f"/proc/{pid}/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  return -1


def _png(size) -> bytes:
  from PIL import Image  # pylint: disable=g-import-not-at-top

  buf = io.BytesIO()
  Image.new("RGB", size).save(buf, "PNG")
  return buf.getvalue()


def _hostile(url: str, port: int, stop: threading.Event, counts: dict):
  """Slow connections, bombs and large images until `stop` is set."""
  import httpx2  # pylint: disable=g-import-not-at-top

  bomb, large = _png((8000, 8000)), _png((3000, 3000))

  def slow(i):
    s = None
    while not stop.is_set():
      if s is None:
        try:
          s = socket.socket()
          s.bind((f"127.0.0.{2 + i % 8}", 0))
          s.connect(("127.0.0.1", port))
          s.sendall(b"POST /api/search HTTP/1.1\r\nHost: 127.0.0.1\r\n")
          s.settimeout(0.5)
          counts["slow_opened"] += 1
        except OSError:
          s = None
          time.sleep(0.2)
          continue
      try:
        if s.recv(1) == b"":
          s.close()
          s = None
          counts["slow_closed_by_server"] += 1
      except socket.timeout:
        pass
      except OSError:
        s = None
    if s is not None:
      s.close()

  def upload(data, key):
    with httpx2.Client(timeout=120) as http:
      while not stop.is_set():
        r = http.post(f"{url}/api/search?k=10", files={"image": ("x.png", data)})
        counts[f"{key}_{r.status_code}"] = counts.get(f"{key}_{r.status_code}", 0) + 1

  threads = [threading.Thread(target=slow, args=(i,), daemon=True) for i in range(200)]
  threads += [threading.Thread(target=upload, args=(bomb, "bomb"), daemon=True) for _ in range(2)]
  threads += [threading.Thread(target=upload, args=(large, "large"), daemon=True)]
  for t in threads:
    t.start()
  return threads


def _load(url: str, files, clients: int, requests: int, k: int, pct=99):
  import httpx2  # pylint: disable=g-import-not-at-top  (the dev extra's HTTP client)

  per_client = [requests // clients + (i < requests % clients) for i in range(clients)]

  def client(c):
    lat = []
    with httpx2.Client(timeout=120) as http:
      for j in range(per_client[c]):
        path = files[(c * 7919 + j) % len(files)]
        with open(path, "rb") as f:
          data = f.read()
        t0 = time.perf_counter()
        r = http.post(f"{url}/api/search?k={k}", files={"image": (os.path.basename(path), data)})
        lat.append(time.perf_counter() - t0)
        if r.status_code != 200 or len(r.json()["hits"]) != k:
          raise RuntimeError(f"bad answer {r.status_code}: {r.text[:300]}")
    return lat

  t0 = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(clients) as pool:
    lat = [x for part in pool.map(client, range(clients)) for x in part]
  wall = time.perf_counter() - t0
  return len(lat) / wall, np.percentile(lat, 50) * 1e3, np.percentile(lat, pct) * 1e3


def main():
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument(
    "--encoder", default=None, help="exported encoder or training workdir (default: train tiny)"
  )
  p.add_argument(
    "--images",
    default=os.path.join(REPO, "..", "shared", "data", "ucmerced"),
    help="image folder whose files are the queries (default: ../shared/data/ucmerced)",
  )
  p.add_argument("--num_codes", type=int, default=100_000)
  p.add_argument("--clients", default="1,8")
  p.add_argument("--requests", type=int, default=200, help="requests per client count")
  p.add_argument("--k", type=int, default=10)
  p.add_argument("--hostile", action="store_true", help="also measure beside a hostile mix")
  p.add_argument("--record", default=None, help="write a JSON record here")
  args = p.parse_args()
  tmp = tempfile.mkdtemp(prefix="rshash_serve_bench_")
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  encoder = args.encoder
  if encoder is None:
    encoder = os.path.join(tmp, "tiny")
    subprocess.run(
      [
        sys.executable,
        "-m",
        "rshash_jax.main",
        "--config=configs/dhcnn.py:tiny",
        f"--workdir={encoder}",
      ],
      cwd=REPO,
      env=env,
      check=True,
      capture_output=True,
    )
    if not os.path.isdir(args.images):
      args.images = os.path.join(encoder, "generated_data")
  exts = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".bmp", ".gif")
  files = sorted(
    os.path.join(d, f) for d, _, fs in os.walk(args.images) for f in fs if f.lower().endswith(exts)
  )
  if not files:
    sys.exit(f"no images under {args.images}")
  files = [files[i] for i in np.random.default_rng(0).permutation(len(files))]
  codes = os.path.join(tmp, "codes.npz")
  enc = _codes_file(encoder, files, args.num_codes, codes)
  port = _free_port()
  server = subprocess.Popen(
    [
      sys.executable,
      "-m",
      "rshash_jax.main",
      "serve",
      f"--encoder={encoder}",
      f"--codes={codes}",
      f"--port={port}",
    ],
    cwd=REPO,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  url = f"http://127.0.0.1:{port}"
  try:
    import httpx2  # pylint: disable=g-import-not-at-top

    deadline = time.monotonic() + 300
    while True:
      if server.poll() is not None or time.monotonic() > deadline:
        sys.exit(f"serve did not start:\n{server.stdout.read()}")
      try:
        info = httpx2.get(f"{url}/api/info", timeout=5).json()
        break
      except httpx2.HTTPError:
        time.sleep(0.5)
    print(
      f"serve: {info['num_codes']} codes, {enc.meta['method']} {enc.meta['backbone']} {enc.bits} "
      f"bits, "
      f"{enc.image_size}px queries from {args.images} ({len(files)} files); {os.cpu_count()} CPU "
      f"cores"
    )
    _load(url, files, 1, 8, args.k)  # warm-up: compiles the batch sizes a first burst meets
    _load(url, files, 8, 16, args.k)
    print(f"{'clients':>7} {'requests':>8} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
    rows = []
    for c in [int(x) for x in args.clients.split(",")]:
      rps, p50, p99 = _load(url, files, c, args.requests, args.k)
      rows.append(dict(clients=c, requests=args.requests, rps=rps, p50_ms=p50, p99_ms=p99))
      print(f"{c:>7} {args.requests:>8} {rps:>8.1f} {p50:>8.1f} {p99:>8.1f}", flush=True)
    payload = {
      "num_codes": info["num_codes"],
      "backbone": enc.meta["backbone"],
      "bits": enc.bits,
      "rows": rows,
    }
    if args.hostile:
      quiet = _load(url, files, 4, args.requests, args.k, pct=95)
      rss_before = _proc_kb(server.pid, "VmRSS")
      stop, counts = threading.Event(), {"slow_opened": 0, "slow_closed_by_server": 0}
      threads = _hostile(url, port, stop, counts)
      time.sleep(3)
      mixed = _load(url, files, 4, args.requests, args.k, pct=95)
      stop.set()
      for t in threads:
        t.join(timeout=10)
      time.sleep(2)
      payload["hostile"] = {
        "normal_clients": 4,
        "quiet": {"rps": quiet[0], "p50_ms": quiet[1], "p95_ms": quiet[2]},
        "beside_hostile_mix": {"rps": mixed[0], "p50_ms": mixed[1], "p95_ms": mixed[2]},
        "server_rss_mb_before": rss_before / 1024,
        "server_peak_rss_mb": _proc_kb(server.pid, "VmHWM") / 1024,
        "server_rss_mb_after": _proc_kb(server.pid, "VmRSS") / 1024,
        "hostile_counts": counts,
      }
      h = payload["hostile"]
      print(
        f"4 normal clients: quiet p50 {quiet[1]:.1f} ms p95 {quiet[2]:.1f} ms; beside the "
        f"hostile mix p50 {mixed[1]:.1f} ms p95 {mixed[2]:.1f} ms; server RSS "
        f"{h['server_rss_mb_before']:.0f} MB before, peak {h['server_peak_rss_mb']:.0f} MB, "
        f"{h['server_rss_mb_after']:.0f} MB after; {counts}"
      )
    print(json.dumps(payload))
    if args.record:
      _record.write(args.record, payload)
  finally:
    server.terminate()
    server.wait(timeout=30)


if __name__ == "__main__":
  main()
