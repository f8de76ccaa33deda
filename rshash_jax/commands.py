"""The commands behind `python -m rshash_jax.main`: encode, search, export.

encode  an image folder (class folders or any tree) or a TFDS split -> a codes file (.npz:
        packed codes, ids, paths, labels, class names, the encoder's identity). Streams in
        chunks (shared out over processes) written to OUT.parts/ and merged at the end; an
        interrupted run resumes at the missing chunks. Memory is bounded by the chunk size.
search  query images (files or a folder) against a codes file: top-k table with Hamming
        distances and paths, the predicted class (DHCNN), and a PNG grid; with --index, a
        multi-index of the same codes ranks them (the same hits, without a linear scan).
index   a codes file -> a multi-index directory (retrieval/multi_index.py) for search.
export  copies a trained workdir's encoder to a new path (never overwrites).
"""

import os
import shutil
import sys
from typing import Dict, List, Optional, Sequence

import jax
import numpy as np
from absl import logging

from rshash_jax import config_defaults, errors
from rshash_jax.data import chunk_store, datasets, input_pipeline, rasters, scenes
from rshash_jax.parallel import distributed
from rshash_jax.retrieval import (
  codes as codes_lib,
  encoder as encoder_lib,
  hamming,
  hits as hits_lib,
  multi_index,
)


def image_table(
  data: str,
  degrade: int = 1,
  check_images: bool = True,
  raster: Optional[rasters.RasterSpec] = None,
  labels_file: Optional[str] = None,
) -> datasets.ImageTable:
  """folder:DIR, DIR (class folders, or any tree of images: labels -1) or tfds:NAME[:split];
  with `labels_file` (a multi-label CSV), the images it lists under DIR with their labels."""
  if labels_file:
    if data.startswith("tfds:"):
      raise errors.InvalidInput(f"--labels applies to an image folder, not {data}")
    table = datasets.label_file(
      labels_file,
      data[len("folder:") :] if data.startswith("folder:") else data,
      check_images=check_images,
    )
  elif data.startswith("tfds:"):
    name, _, split = data[len("tfds:") :].partition(":")
    table = datasets.tfds_table(name, split=split or "train", download=False)
  else:
    root = os.path.abspath(data[len("folder:") :] if data.startswith("folder:") else data)
    try:
      table = datasets.class_folder(root, check_images=check_images)
    except ValueError as e:
      if "class-folder tree" not in str(e):
        raise
      paths = sorted(
        os.path.join(d, f)
        for d, _, fs in os.walk(root)
        for f in fs
        if f.lower().endswith(datasets.IMAGE_EXTENSIONS)
      )
      if not paths:
        raise errors.InvalidInput(
          f"no images ({'/'.join(datasets.IMAGE_EXTENSIONS)}) under {root}"
        ) from e
      if check_images:
        for p in paths:
          datasets.check_image(p)
      table = datasets.ImageTable(
        name=os.path.basename(root),
        labels=np.full(len(paths), -1, np.int32),
        class_names=[],
        paths=paths,
        description=f"images under {root}",
      )
  table.degrade = degrade
  spec = raster or rasters.RasterSpec()
  if (
    table.paths is not None or not spec.is_default
  ):  # rasters' headers checked before any long work
    table = table.with_raster(spec)
  return table


def encode(
  encoder_path: str,
  data: str,
  out: str,
  *,
  batch_size: int = 64,
  chunk: int = 4096,
  threads: int = 0,
  labels_file: Optional[str] = None,
  grid: Optional[scenes.Grid] = None,
) -> str:
  """Encodes `data` with the encoder at `encoder_path` into the codes file `out` (.npz).
  With `grid`, `data` is a scene archive (a raster, a folder of rasters or a list file)
  cut into windows (rshash_jax/data/scenes.py); each code keeps its scene, window and
  footprint.

  Chunks of `chunk` images are shared out over the processes (each encodes its chunks on
  its own devices) and written to OUT.parts/ as they finish; a re-run continues at the
  missing chunks. The primary process writes the codes file, atomically."""
  for name, v, hi in (
    ("batch_size", batch_size, config_defaults.MAX_BATCH),
    ("chunk", chunk, 1 << 24),
  ):
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= hi:
      raise errors.TooLarge(f"encode: --{name}={v!r} must be an integer in [1, {hi}]")
  enc = encoder_lib.load_encoder(encoder_path)
  if not out.endswith(".npz"):
    out += ".npz"
  if distributed.agree(f"codes {out} exists", os.path.exists(out)):
    raise errors.AlreadyExists(f"codes file exists, nothing overwritten: {out}")
  if grid is not None:
    if labels_file:
      raise errors.InvalidInput("--labels applies to image folders, not to --tile scene archives")
    table = datasets.scene_table(data, grid, enc.raster)
    table.degrade = enc.meta.get("degrade", 1)
  else:
    table = image_table(
      data, enc.meta.get("degrade", 1), raster=enc.raster, labels_file=labels_file
    )
  n = len(table)
  store = chunk_store.ChunkStore(
    out + ".parts",
    n,
    {"codes": ((hamming.num_words(enc.bits),), "uint32"), "predicted": ((), "int32")},
    chunk=chunk,
    key=f"{enc.identity} {table.fingerprint()}",
  )
  source = input_pipeline.ImageSource(table, enc.image_size, cache_dir=out + ".images")
  n_dev = enc.mesh.devices.size
  gb = -(-batch_size // n_dev) * n_dev
  print(
    f"encoding {n} images of {table.description} with encoder {enc.identity} "
    f"({enc.meta['method']}, "
    f"{enc.bits} bits) on {jax.process_count()} process(es)",
    file=sys.stderr,
  )

  def compute(start, stop):
    codes = np.zeros((stop - start, hamming.num_words(enc.bits)), np.uint32)
    pred = np.full(stop - start, -1, np.int32)
    for b in input_pipeline.eval_batches(
      source, np.arange(start, stop), global_batch=gb, threads=threads, local=True
    ):
      res = enc.encode(b["image"])
      rows = b["pos"][b["mask"]]
      codes[rows] = res["codes"][b["mask"]]
      if "predicted" in res:
        pred[rows] = res["predicted"][b["mask"]]
    return {"codes": codes, "predicted": pred}

  arrays = store.build(compute, name="encode", log=lambda msg: print(f"  {msg}", file=sys.stderr))

  lonlat = table.lonlat()
  paths = table.paths or [f"{table.tfds_name}:{table.tfds_split}[{i}]" for i in table.ids]
  distributed.write_once(
    out,
    lambda tmp: codes_lib.write_codes(
      tmp,
      codes=arrays["codes"],
      ids=table.ids,
      labels=table.labels,
      lonlat=lonlat,
      predicted=arrays["predicted"],
      paths=paths,
      # An unlabelled archive (any tree, scenes) names the encoder's classes, which its
      # `predicted` ids count.
      class_names=table.class_names or list(enc.class_names),
      encoder=enc,
      tiles=table.tiles,
    ),
    name="codes file",
  )
  if distributed.is_primary():
    shutil.rmtree(store.directory)
    shutil.rmtree(out + ".images", ignore_errors=True)  # a TFDS source's decoded images
  return out


def _query_paths(queries: Sequence[str], archive: hits_lib.Archive) -> List[str]:
  """Image files and folders of images, in order; tile paths of the archive stay as given
  (their stored codes are the queries)."""
  paths = []
  for q in queries:
    if scenes.is_tile(q):
      if archive.row(q) is None:
        raise errors.NotFound(f"query tile {q} is not a window of the codes file")
      paths.append(q)
    elif os.path.isdir(q):
      paths += sorted(
        os.path.join(d, f)
        for d, _, fs in os.walk(q)
        for f in fs
        if f.lower().endswith(datasets.IMAGE_EXTENSIONS)
      )
    elif os.path.isfile(q):
      paths.append(q)
    else:
      raise errors.NotFound(f"query image not found: {q}")
  return paths


def parse_region(bbox: Optional[Sequence[str]] = None, within: Optional[str] = None):
  """A spatial filter as a WGS84 shapely geometry: --bbox=MINLON,MINLAT,MAXLON,MAXLAT and/or
  --within=FILE (a GeoJSON geometry, Feature or FeatureCollection: their union); both
  given: their intersection. None without either."""
  import shapely  # pylint: disable=g-import-not-at-top

  geoms = []
  if bbox:
    try:
      v = [float(x) for x in bbox]
    except ValueError:
      v = []
    if len(v) != 4 or not np.isfinite(v).all() or v[0] >= v[2] or v[1] >= v[3]:
      raise errors.InvalidInput(
        f"--bbox={','.join(map(str, bbox))} is invalid: MINLON,MINLAT,MAXLON,MAXLAT (WGS84, "
        "min < max)"
      )
    geoms.append(shapely.box(*v))
  if within:
    geoms.append(read_geojson_geometry(within, "--within"))
  if not geoms:
    return None
  return geoms[0] if len(geoms) == 1 else shapely.intersection(*geoms)


MAX_GEOJSON_BYTES = 64 << 20


def read_geojson_geometry(path: str, name: str):
  """The union of the geometries of a GeoJSON file (WGS84), bounded in size; errors name
  the file."""
  import json  # pylint: disable=g-import-not-at-top

  import shapely  # pylint: disable=g-import-not-at-top
  import shapely.geometry  # pylint: disable=g-import-not-at-top

  if not os.path.isfile(path):
    raise errors.NotFound(f"{name}: file not found: {path}")
  if os.path.getsize(path) > MAX_GEOJSON_BYTES:
    raise errors.TooLarge(f"{name}: {path} is over {MAX_GEOJSON_BYTES >> 20} MiB")
  try:
    with open(path, encoding="utf-8") as f:
      doc = json.load(f)
    kind = doc.get("type")
    items = (
      [ft.get("geometry") for ft in doc.get("features", [])]
      if kind == "FeatureCollection"
      else [doc.get("geometry")]
      if kind == "Feature"
      else [doc]
    )
    geoms = [shapely.geometry.shape(g) for g in items if g]
  except (ValueError, AttributeError, TypeError, KeyError, shapely.errors.ShapelyError) as e:
    raise errors.InvalidInput(f"{name}: {path} is not a GeoJSON geometry ({e})") from None
  if not geoms:
    raise errors.InvalidInput(f"{name}: {path} holds no geometry")
  if not all(g.is_valid for g in geoms):
    raise errors.InvalidInput(f"{name}: {path} holds an invalid geometry (self-intersecting?)")
  return shapely.union_all(geoms)


def search(
  encoder_path: str,
  codes_path: str,
  queries: Sequence[str],
  *,
  k: int = 10,
  png: Optional[str] = None,
  geojson: Optional[str] = None,
  index_path: Optional[str] = None,
  index_engine: str = "auto",
  points: Sequence[Sequence[float]] = (),
  query_ids: Sequence[int] = (),
  region=None,
) -> List[Dict]:
  """Top-k of each query in a codes file; prints a table (with each hit's WGS84
  coordinates where the codes file has them), optionally a PNG grid and a GeoJSON file
  (footprint polygons for a scene archive's windows).

  Queries: image files or folders (encoded), the archive's own tile paths, `query_ids`
  (archive rows) and `points` ((lon, lat) in WGS84: the archive window that holds each);
  archive entries are queried by their stored codes. `region` (a WGS84 shapely geometry,
  parse_region) keeps only the archive entries it intersects, before ranking.
  With `index_path` (written by `index` from the same codes file) the ranking is the
  multi-index's: the same hits in the same order, without a scan of every code
  (`index_engine`: auto, the engine `index` measured faster at this k; multi_index; scan);
  a region filter ranks its entries by a scan."""
  enc = encoder_lib.load_encoder(encoder_path)
  db = codes_lib.load_codes(codes_path, enc)
  mi = multi_index.open_matching(index_path, db["codes"], codes_path) if index_path else None
  for out_path in (png, geojson):
    if out_path and distributed.agree(f"output {out_path} exists", os.path.exists(out_path)):
      raise errors.AlreadyExists(f"output exists, nothing overwritten: {out_path}")
  archive = hits_lib.Archive(db)
  paths = _query_paths(queries, archive)
  rows: List[Optional[int]] = [archive.row(p) if scenes.is_tile(p) else None for p in paths]
  for i in query_ids:
    if isinstance(i, bool) or not 0 <= int(i) < len(archive):
      raise errors.NotFound(f"--query_id={i}: the codes file has ids 0..{len(archive) - 1}")
    paths.append(archive.paths[int(i)])
    rows.append(int(i))
  for lon, lat in points:
    r = archive.locate(float(lon), float(lat))
    if r is None:
      raise errors.NotFound(
        f"--point={lon},{lat}: no window or image of {codes_path} holds this point"
      )
    paths.append(archive.paths[r])
    rows.append(r)
  if not paths:
    raise errors.InvalidInput(f"no query images in {list(queries)}")
  degrade = enc.meta.get("degrade", 1)
  files = [i for i, r in enumerate(rows) if r is None]
  res = {"codes": np.zeros((len(paths), db["codes"].shape[1]), np.uint32)}
  if files:
    imgs = np.stack(
      [
        input_pipeline.load_image(paths[i], enc.image_size, degrade=degrade, raster=enc.raster)
        for i in files
      ]
    )
    encoded = enc.encode(imgs)
    for key, v in encoded.items():
      if key != "codes":
        res[key] = np.zeros((len(paths),) + v.shape[1:], v.dtype)
      res[key][files] = v
  stored = [i for i, r in enumerate(rows) if r is not None]
  res["codes"][stored] = db["codes"][[rows[i] for i in stored]]
  subset = None
  if region is not None:
    subset = archive.region(region)
    if not len(subset):
      raise errors.InvalidInput(f"the spatial filter keeps none of the {len(archive)} entries")
  n_db = len(archive) if subset is None else len(subset)
  k = min(k, n_db)
  if subset is not None:
    dist, idx = hamming.subset_topk(res["codes"], db["codes"], subset, k)
  elif mi is not None:
    dist, idx = mi.search(res["codes"], k, engine=index_engine)
  else:
    dist, idx = hamming.hamming_topk(res["codes"], db["codes"], k)
  # Every process ranks (the database is sharded over all of them); the primary prints.
  say = print if distributed.is_primary() else (lambda *a, **k: None)
  if subset is not None:
    say(f"spatial filter: {len(subset)} of {len(archive)} archive entries ranked")
  out = []
  coords = archive.has_coordinates
  for qi, p in enumerate(paths):
    row = rows[qi] if rows[qi] is not None else archive.row(p)
    q_lab = archive.query_labels(p, row)
    if rows[qi] is not None:
      p_id = int(db["predicted"][row])  # the encoder's class when it encoded the archive
      pred = archive.class_names[p_id] if 0 <= p_id < len(archive.class_names) else None
      entry = archive.entry(row)
    else:
      pred = hits_lib.predicted(enc.class_names, bool(enc.meta.get("multilabel")), res, qi)
      q_lonlat = rasters.center_lonlat(p) if rasters.is_raster(p) else (np.nan, np.nan)
      ok = np.isfinite(q_lonlat).all()
      entry = {"lon": float(q_lonlat[0]) if ok else None, "lat": float(q_lonlat[1]) if ok else None}
    where = (
      f"  at lon {entry['lon']:.6f}, lat {entry['lat']:.6f}" if entry["lon"] is not None else ""
    )
    say(f"\nquery {p}" + (f"  predicted: {pred}" if pred else "") + where)
    say(
      f"  {'rank':>4} {'dist':>4}  {'label':<20} "
      + (f"{'lon':>11} {'lat':>10}  " if coords else "")
      + "path"
    )
    hits = archive.hits(dist[qi], idx[qi], q_lab)
    for h in hits:
      mark = "" if h["relevant"] is None else ("  relevant" if h["relevant"] else "  not relevant")
      where = ""
      if coords:
        where = (
          f"{h['lon']:>11.6f} {h['lat']:>10.6f}  "
          if h["lon"] is not None
          else f"{'-':>11} {'-':>10}  "
        )
      say(f"  {h['rank']:>4} {h['distance']:>4}  {h['label'] or '-':<20} {where}{h['path']}{mark}")
    q = {k_: v for k_, v in entry.items() if k_ in ("lon", "lat", "scene", "window", "footprint")}
    out.append(dict(query=p, predicted=pred, results=hits, **q))
  if not archive.has_coordinates and geojson:
    say(
      f"\nnote: {codes_path} has no coordinates (no georeferenced GeoTIFFs): the GeoJSON's hits "
      f"have "
      "null geometry"
    )
  if png:
    distributed.write_once(
      png, lambda tmp: grid(out, tmp, enc.image_size, enc.raster), name="search grid"
    )
  if geojson:
    distributed.write_once(
      geojson, lambda tmp: hits_lib.write_geojson(out, tmp), name="search GeoJSON"
    )
  return out


def build_index(
  codes_path: str, out: str, *, substrings: Optional[int] = None, calibrate: bool = True
) -> str:
  """Writes a multi-index (retrieval/multi_index.py) of a codes file's codes to `out`;
  with `calibrate`, times it against the scan here and stores the faster per k (what
  `search --index` and `serve --index` then use, unless told otherwise)."""
  db = codes_lib.load_codes(codes_path)
  if distributed.agree(f"output {out} exists", os.path.exists(out)):
    raise errors.AlreadyExists(f"output exists, nothing overwritten: {out}")

  def write(tmp):  # the primary builds and writes; the other processes wait for the file
    index = multi_index.MultiIndex(db["codes"], bits=int(db["bits"]), substrings=substrings)
    if calibrate:
      for e in index.calibrate()["entries"]:
        logging.info(
          "k=%d: multi-index %.4f s, scan %.4f s per %d queries -> %s",
          e["k"],
          e["multi_index_s"],
          e["scan_s"],
          index.meta["crossover"]["queries"],
          e["engine"],
        )
    index.save(tmp, codes_file=os.path.abspath(codes_path), identity=str(db["identity"]))
    logging.info(
      "multi-index of %d codes (%d bits): %d substrings, tables %.1f MiB",
      index.num_codes,
      index.bits,
      len(index.parts),
      index.nbytes() / 2**20,
    )

  distributed.write_once(out, write, name="multi-index")
  return out


def grid(results: List[Dict], png: str, size: int, raster: Optional[rasters.RasterSpec] = None):
  """Query | top-k thumbnails; green / red frames mark relevant / not relevant."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  k = max(len(r["results"]) for r in results)
  fig, axes = plt.subplots(
    len(results), k + 1, figsize=(1.6 * (k + 1), 1.8 * len(results)), squeeze=False
  )
  for row, r in zip(axes, results):
    for ax in row:
      ax.axis("off")
    row[0].imshow(
      input_pipeline.load_image(r["query"], min(size, 128), raster=raster)[..., :3]
    )  # R, G, B come first
    row[0].set_title("query" + (f"\n{r['predicted']}" if r["predicted"] else ""), fontsize=7)
    for ax, h in zip(row[1:], r["results"]):
      path = h["path"]
      if os.path.isfile(path):
        ax.imshow(input_pipeline.load_image(path, min(size, 128), raster=raster)[..., :3])
      ax.set_title(f"d={h['distance']} {h['label'] or '-'}", fontsize=6)
      if h["relevant"] is not None:
        ax.axis("on")
        ax.set_xticks([])
        ax.set_yticks([])
        for sp in ax.spines.values():
          sp.set_edgecolor("green" if h["relevant"] else "red")
          sp.set_linewidth(3)
  fig.tight_layout()
  fig.savefig(png, dpi=100, format="png")
  plt.close(fig)


def export(workdir: str, out: str) -> str:
  """Copies WORKDIR/encoder (written at the end of training) to `out`; never overwrites."""
  src = os.path.join(workdir, "encoder")
  if not os.path.isfile(os.path.join(src, "encoder.json")):
    raise errors.NotFound(
      f"no trained encoder in {workdir} (expected {src}/encoder.json): train to the end first"
    )
  if distributed.agree(f"export {out} exists", os.path.exists(out)):
    raise errors.AlreadyExists(f"export path exists, nothing written: {out}")
  encoder_lib.load_encoder(src)  # fails loudly on a damaged encoder before copying
  distributed.write_once(os.path.abspath(out), lambda tmp: shutil.copytree(src, tmp), name="export")
  return out
