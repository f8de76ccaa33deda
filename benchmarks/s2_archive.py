"""A Sentinel-2-like 13-band GeoTIFF archive built from an RGB class-folder dataset, and
the DHCNN runs that compare band settings on it.

    python benchmarks/s2_archive.py --data=../shared/data/ucmerced --out=/tmp/ucm_s2
    python benchmarks/s2_archive.py --out=/tmp/ucm_s2 --run   # also train + evaluate each setting
    python benchmarks/s2_archive.py --out=/tmp/ucm_s2 --read_rate   # tiles/s read per setting

Each image becomes a uint16 GeoTIFF of 13 bands described B1..B12, B8A (Sentinel-2's
order), `--size` pixels square, with a UTM zone 32N transform (10 m pixels, one tile per
grid cell) and reflectance-like values: B4, B3, B2 = the image's R, G, B * 30 + 200
(L2A reflectance x 10000 is of that order); B8 (NIR) = 1.6 x G - 0.5 x R clipped (bright
where green dominates, as vegetation is); the other bands are smoothed mixtures of R, G
and B plus noise. Nothing here is real Sentinel-2 physics: it is an archive with the
layout, types and value ranges a Sentinel-2 user brings, with the content of real scenes.

--read_rate reads the first 200 tiles with each band setting (rasters.read: bands, scaling,
uint8), 3 passes after one warm-up pass, and prints the median tiles/s on one core.
--run trains `configs/dhcnn.py:local` (unchanged) per band setting and prints the test
mAP / accuracy from each run's results.json and the run's wall time (feature extraction
included).
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
S2 = ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12"]
SETTINGS = [
  ("B4,B3,B2", "10000"),
  ("4,3,2", "stretch"),
  ("B8,B4,B3", "stretch"),
  ("all:B4,B3,B2", "10000"),
  ("all:B4,B3,B2", "stretch"),
]


def build(data: str, out: str, size: int, seed: int = 0):
  import rasterio  # pylint: disable=g-import-not-at-top
  from rasterio.transform import from_origin  # pylint: disable=g-import-not-at-top

  sys.path.insert(0, REPO)
  from rshash_jax.data import datasets, input_pipeline  # pylint: disable=g-import-not-at-top

  table = datasets.class_folder(data)
  rng = np.random.default_rng(seed)
  for i, (path, label) in enumerate(zip(table.paths, table.labels)):
    dst_dir = os.path.join(out, table.class_names[label])
    os.makedirs(dst_dir, exist_ok=True)
    dst = os.path.join(dst_dir, os.path.splitext(os.path.basename(path))[0] + ".tif")
    if os.path.exists(dst):
      continue
    rgb = input_pipeline.load_image(path, size).astype(np.float32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    bands = {
      "B4": r * 30 + 200,
      "B3": g * 30 + 200,
      "B2": b * 30 + 200,
      "B8": np.clip(1.6 * g - 0.5 * r, 0, None) * 30 + 300,
    }
    for name in S2:
      if name not in bands:
        w = rng.dirichlet((1, 1, 1))
        bands[name] = (w[0] * r + w[1] * g + w[2] * b) * 25 + 150 + rng.normal(0, 40, r.shape)
    data_ = np.stack([np.clip(bands[n], 1, 65535) for n in S2]).astype(np.uint16)
    x0, y0 = 500000.0 + (i % 50) * size * 10.0, 5200000.0 - (i // 50) * size * 10.0
    with rasterio.open(
      dst,
      "w",
      driver="GTiff",
      width=size,
      height=size,
      count=13,
      dtype="uint16",
      crs="EPSG:32632",
      transform=from_origin(x0, y0, 10.0, 10.0),
      nodata=0,
    ) as f:
      f.write(data_)
      for j, n in enumerate(S2, 1):
        f.set_band_description(j, n)
  return table


def main():
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--data", default=os.path.join(REPO, "..", "shared", "data", "ucmerced"))
  p.add_argument("--out", required=True)
  p.add_argument("--size", type=int, default=128)
  p.add_argument("--run", action="store_true")
  p.add_argument("--read_rate", action="store_true")
  p.add_argument(
    "--settings",
    default="",
    help="run only these settings, as BANDS/SCALE;BANDS/SCALE "
    "(e.g. 'all:B4,B3,B2/10000'); default: all of SETTINGS",
  )
  args = p.parse_args()
  settings = [tuple(s.split("/")) for s in args.settings.split(";")] if args.settings else SETTINGS
  t0 = time.time()
  table = build(args.data, args.out, args.size)
  print(
    f"archive: {len(table)} 13-band GeoTIFFs in {args.out} ({time.time() - t0:.0f} s)", flush=True
  )
  if args.read_rate:
    from rshash_jax.data import rasters  # pylint: disable=g-import-not-at-top

    tiles = sorted(
      os.path.join(d, f) for d, _, fs in os.walk(args.out) for f in fs if f.endswith(".tif")
    )[:200]
    for path in tiles:  # warm-up: the page cache and rasterio's driver, for every setting alike
      rasters.read_bands(path, rasters.RasterSpec.parse("all", "10000"))
    for bands, scale in settings:
      spec = rasters.RasterSpec.parse(bands, scale)
      if spec.needs_fit:
        spec = rasters.fit_stretch(tiles, spec)
      times = []
      for _ in range(3):
        t = time.perf_counter()
        for path in tiles:
          rasters.read(path, spec)
        times.append(time.perf_counter() - t)
      print(
        f"read {bands:<14} {scale:<8} {len(tiles) / np.median(times):.0f} tiles/s "
        f"({args.size}x{args.size}, "
        "13-band uint16, median of 3)",
        flush=True,
      )
  if not args.run:
    return
  print(
    f"{'bands':<14} {'scale':<8} {'mAP':>7} {'accuracy':>8} {'run s':>6} {'features img/s':>14}"
  )
  for bands, scale in settings:
    work = os.path.join(args.out + "_runs", f"{bands.replace(',', '').replace(':', '_')}_{scale}")
    t = time.time()
    subprocess.run(
      [
        sys.executable,
        "-m",
        "rshash_jax.main",
        "--config=configs/dhcnn.py:local",
        f"--config.data.source=folder:{args.out}",
        f"--config.data.bands={bands}",
        f"--config.data.scale={scale}",
        f"--workdir={work}",
      ],
      cwd=REPO,
      check=True,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
    )
    res = json.load(open(os.path.join(work, "results.json")))
    feats = res.get("timing", {}).get("data_and_features_seconds") or float("nan")
    print(
      f"{bands:<14} {scale:<8} {res['map']:>7.4f} {res.get('accuracy', float('nan')):>8.4f} "
      f"{time.time() - t:>6.0f} {len(table) / feats:>14.1f}",
      flush=True,
    )


if __name__ == "__main__":
  main()
