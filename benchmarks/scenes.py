r"""Whole scenes: encode large GeoTIFF mosaics window by window, and search them.

    python benchmarks/scenes.py --data=../shared/data/ucmerced --work=/tmp/rshash_scenes \
        --record=benchmarks/results/scenes.json

What it builds (once, in --work): UC Merced split per class into 90 placed images and 10
held-out queries (seeded); four scenes of 36 x 36 cells of 256 px (9216 x 9216 px, 0.3 m
pixels as UC Merced's, RGB uint8, tiled GeoTIFF), two in UTM 31N and two in UTM 33N:
1.02 GB of pixels. Every cell holds a placed image (resized to 256 px where it is not)
under one of the 8 rotations / flips, at a known position; the layout is written beside
the scenes. A "small" archive of four 12 x 12-cell scenes (1/9 of the pixels) is cut
from the same layout.

What it measures (each command a fresh process, its memory polled every 20 ms):
  1. an encoder: `configs/dhcnn.py:neighbours` trained on the placed images only (the
     archive's own images; the queries are never seen);
  2. `encode --tile=256 --stride=256` of the small and the full scene archive: windows/s
     and peak RssAnon / VmRSS (flat in the scene size: the windows are read one at a
     time); the peer, in the same run: `encode` of the 1890 placed images as files
     (images/s); --repeats runs of each, interleaved: median wall time, peak memory the
     largest of the runs;
  3. exactness: windows whose cell holds an image of exactly 256 px unrotated have the
     code of that image's file;
  4. retrieval: each held-out query against the full scene archive, top 10 and top 100:
     the fraction of hits whose cell holds the query's class (P@k), against the same
     queries in the placed images' files (the peer's codes).
"""

import argparse
import json
import os
import subprocess
import sys
import time

import _record
import numpy as np
import scale

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from rshash_jax.data import datasets  # noqa: E402
from rshash_jax.retrieval import codes as codes_lib, hamming  # noqa: E402

CELL = 256
SCENES = (  # name, CRS, origin (west, north) in metres
  ("utm31_a", "EPSG:32631", (500000.0, 5000000.0)),
  ("utm31_b", "EPSG:32631", (520000.0, 5000000.0)),
  ("utm33_a", "EPSG:32633", (300000.0, 5100000.0)),
  ("utm33_b", "EPSG:32633", (320000.0, 5100000.0)),
)


def _dihedral(img: np.ndarray, t: int) -> np.ndarray:
  img = np.rot90(img, t % 4)
  return img[:, ::-1] if t >= 4 else img


def split(data: str, held_out: int, seed: int):
  """(placed paths, placed labels, query paths, query labels, class names)."""
  table = datasets.class_folder(data, check_images=False)
  rng = np.random.default_rng(seed)
  placed, queries = [], []
  for c in range(table.num_classes):
    idx = rng.permutation(np.nonzero(table.labels == c)[0])
    queries += sorted(idx[:held_out].tolist())
    placed += sorted(idx[held_out:].tolist())
  paths = np.asarray(table.paths)
  return (
    paths[placed].tolist(),
    table.labels[placed],
    paths[queries].tolist(),
    table.labels[queries],
    table.class_names,
  )


def build(work: str, placed, cells: int, seed: int) -> dict:
  """The scenes of `cells` x `cells` cells under work/scenes_<cells>, and their layout."""
  import rasterio  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from rasterio.transform import from_origin  # pylint: disable=g-import-not-at-top
  from rasterio.windows import Window  # pylint: disable=g-import-not-at-top

  out = os.path.join(work, f"scenes_{cells}")
  layout_path = os.path.join(out, "layout.json")
  if os.path.exists(layout_path):
    with open(layout_path) as f:
      return json.load(f)
  os.makedirs(out, exist_ok=True)
  rng = np.random.default_rng(seed)
  n = len(placed)
  per_scene = cells * cells
  # Each placed image at least once, the rest drawn at random; a random rotation / flip.
  order = np.concatenate([rng.permutation(n)] * (-(-len(SCENES) * per_scene // n)))
  order = order[: len(SCENES) * per_scene]
  transform = rng.integers(0, 8, len(order))
  layout = {"cell": CELL, "cells": cells, "scenes": []}
  t0 = time.perf_counter()
  for s, (name, crs, (west, north)) in enumerate(SCENES):
    path = os.path.join(out, f"{name}.tif")
    size = cells * CELL
    cell_img, cell_t = [], []
    with rasterio.open(
      path + ".tmp",
      "w",
      driver="GTiff",
      width=size,
      height=size,
      count=3,
      dtype="uint8",
      crs=crs,
      transform=from_origin(west, north, 0.3, 0.3),
      tiled=True,
      blockxsize=256,
      blockysize=256,
      photometric="RGB",
    ) as dst:
      for r in range(cells):
        strip = np.zeros((CELL, size, 3), np.uint8)
        for c in range(cells):
          k = s * per_scene + r * cells + c
          with Image.open(placed[order[k]]) as im:
            im = im.convert("RGB")
            exact = im.size == (CELL, CELL)
            img = np.asarray(im if exact else im.resize((CELL, CELL), Image.BILINEAR))
          strip[:, c * CELL : (c + 1) * CELL] = _dihedral(img, int(transform[k]))
          cell_img.append(int(order[k]))
          cell_t.append(int(transform[k]) if exact else -1)
        dst.write(strip.transpose(2, 0, 1), window=Window(0, r * CELL, size, CELL))
    os.replace(path + ".tmp", path)
    layout["scenes"].append({"path": path, "crs": crs, "image": cell_img, "transform": cell_t})
  layout["build_s"] = time.perf_counter() - t0
  layout["pixel_bytes"] = len(SCENES) * (cells * CELL) ** 2 * 3
  with open(layout_path, "w") as f:
    json.dump(layout, f)
  return layout


def _cli(*args):
  return [sys.executable, "-m", "rshash_jax.main", *args]


def main():
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--data", default=os.path.join(REPO, "..", "shared", "data", "ucmerced"))
  p.add_argument("--work", default="/tmp/rshash_scenes")
  p.add_argument("--cells", type=int, default=36, help="cells a side of each full scene")
  p.add_argument("--small_cells", type=int, default=12, help="cells a side, small archive")
  p.add_argument("--held_out", type=int, default=10, help="queries per class")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--repeats", type=int, default=3, help="encodes of each archive, interleaved")
  p.add_argument("--record", default=None, help="write a JSON record here (benchmarks/_record.py)")
  args = p.parse_args()
  args.work = os.path.abspath(args.work)
  os.makedirs(args.work, exist_ok=True)
  placed, placed_labels, queries, query_labels, names = split(args.data, args.held_out, args.seed)
  # The placed images as a class folder of links: the encoder's training set and the peer.
  folder = os.path.join(args.work, "placed")
  if not os.path.isdir(folder):
    for path in placed:
      cls = os.path.basename(os.path.dirname(path))
      os.makedirs(os.path.join(folder + ".tmp", cls), exist_ok=True)
      os.symlink(os.path.abspath(path), os.path.join(folder + ".tmp", cls, os.path.basename(path)))
    os.replace(folder + ".tmp", folder)
  full = build(args.work, placed, args.cells, args.seed)
  small = build(args.work, placed, args.small_cells, args.seed)
  print(
    f"scenes: 4 x {args.cells * CELL} px ({full['pixel_bytes'] / 1e9:.2f} GB of pixels), "
    f"small 4 x {args.small_cells * CELL} px; built in {full.get('build_s', 0):.0f} s",
    flush=True,
  )
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  workdir = os.path.join(args.work, "encoder")
  if not os.path.exists(os.path.join(workdir, "encoder")):
    t0 = time.perf_counter()
    with open(os.path.join(args.work, "train.log"), "w") as log:  # training logs a lot
      subprocess.run(
        _cli(
          "--config=configs/dhcnn.py:neighbours",
          f"--workdir={workdir}",
          f"--config.data.source=folder:{folder}",
          f"--config.features.cache_dir={os.path.join(args.work, 'features')}",
        ),
        env=env,
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        check=True,
      )
    print(f"encoder trained in {time.perf_counter() - t0:.0f} s", flush=True)
  result = {
    "scenes": len(SCENES),
    "cells": args.cells,
    "small_cells": args.small_cells,
    "pixel_bytes": full["pixel_bytes"],
    "small_pixel_bytes": small["pixel_bytes"],
    "placed_images": len(placed),
    "queries": len(queries),
    "encode": [],
  }
  codes = {}
  runs = (
    ("files (peer)", folder, []),
    ("small scenes", os.path.dirname(small["scenes"][0]["path"]), ["--tile=256", "--stride=256"]),
    ("full scenes", os.path.dirname(full["scenes"][0]["path"]), ["--tile=256", "--stride=256"]),
  )
  print("\n| archive | items | wall s | items/s | peak RssAnon MiB | peak VmRSS MiB |")
  print("|---|---|---|---|---|---|")
  raw = {name: [] for name, _, _ in runs}
  for rep in range(args.repeats):  # interleaved: a slow minute hits every archive alike
    for name, data, extra in runs:
      out = os.path.join(args.work, f"codes_{name.split()[0]}_{os.getpid()}.npz")
      wall, anon, rss, _ = scale.run(
        _cli("encode", f"--encoder={workdir}", f"--data={data}", f"--out={out}", *extra), env
      )
      if rep == 0:
        codes[name] = codes_lib.load_codes(out)
      os.remove(out)
      raw[name].append((wall, anon, rss))
      n = len(codes[name]["codes"])
      print(f"| {name} | {n} | {wall:.1f} | {n / wall:.1f} | {anon:.0f} | {rss:.0f} |", flush=True)
  for name, _, _ in runs:
    walls = [w for w, _, _ in raw[name]]
    n = len(codes[name]["codes"])
    result["encode"].append(
      {
        "archive": name,
        "items": n,
        "wall_s_raw": walls,
        "wall_s": float(np.median(walls)),
        "items_per_s": n / float(np.median(walls)),
        "peak_rss_anon_mib": max(a for _, a, _ in raw[name]),
        "peak_vmrss_mib": max(r for _, _, r in raw[name]),
      }
    )
  files, scene_db = codes["files (peer)"], codes["full scenes"]
  # Which placed image (and class) each window holds, from the layout.
  by_path = {os.path.realpath(str(p)): i for i, p in enumerate(files["paths"])}
  placed_row = np.asarray([by_path[os.path.realpath(p)] for p in placed])
  scene_index = {s["path"]: i for i, s in enumerate(full["scenes"])}
  win_img = np.empty(len(scene_db["codes"]), np.int64)
  win_t = np.empty(len(scene_db["codes"]), np.int64)
  for j, (s, w) in enumerate(zip(scene_db["scene"], scene_db["window"])):
    spec = full["scenes"][scene_index[str(scene_db["scenes"][s])]]
    cell = (w[1] // CELL) * args.cells + w[0] // CELL
    win_img[j], win_t[j] = spec["image"][cell], spec["transform"][cell]
  win_class = placed_labels[win_img]
  plain = np.nonzero(win_t == 0)[0]
  same = (scene_db["codes"][plain] == files["codes"][placed_row[win_img[plain]]]).all(axis=1)
  result["exact_windows"] = {"checked": len(plain), "equal_codes": int(same.sum())}
  print(f"\nunrotated 256-px cells: {same.sum()} of {len(plain)} windows have their file's code")
  # Retrieval of held-out queries: encode them once (search --query files would re-load).
  from rshash_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from rshash_jax.retrieval import encoder as encoder_lib  # pylint: disable=g-import-not-at-top

  enc = encoder_lib.load_encoder(workdir)
  imgs = np.stack([input_pipeline.load_image(q, enc.image_size) for q in queries])
  q_codes = np.concatenate([enc.encode(imgs[i : i + 64])["codes"] for i in range(0, len(imgs), 64)])
  result["retrieval"] = []
  print("\n| archive | P@10 | P@100 |\n|---|---|---|")
  file_class = np.asarray(files["labels"])
  for name, db, cls in (("full scenes", scene_db, win_class), ("files (peer)", files, file_class)):
    row = {"archive": name}
    for k in (10, 100):
      _, idx = hamming.hamming_topk(q_codes, db["codes"], min(k, len(db["codes"])))
      row[f"p_at_{k}"] = float((cls[idx] == query_labels[:, None]).mean())
    result["retrieval"].append(row)
    print(f"| {name} | {row['p_at_10']:.4f} | {row['p_at_100']:.4f} |")
  enc_rows = {r["archive"]: r for r in result["encode"]}
  result["ratios"] = {
    "windows_per_s_vs_files": enc_rows["full scenes"]["items_per_s"]
    / enc_rows["files (peer)"]["items_per_s"],
    "rss_anon_full_vs_small": enc_rows["full scenes"]["peak_rss_anon_mib"]
    / enc_rows["small scenes"]["peak_rss_anon_mib"],
  }
  print(
    f"\nwindows/s / files' images/s: {result['ratios']['windows_per_s_vs_files']:.2f}; "
    f"peak RssAnon, full / small (9x the pixels): "
    f"{result['ratios']['rss_anon_full_vs_small']:.3f}"
  )
  if args.record:
    _record.write(args.record, result)


if __name__ == "__main__":
  main()
