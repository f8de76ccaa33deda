"""Scene archives: large rasters cut into windows, each code keeping its scene and footprint.

Remote-sensing archives are mostly whole scenes (Sentinel-2 granules of 10980 x 10980 px,
Landsat scenes, orthophoto mosaics, COGs), not folders of patches. Here any tree or list
of rasters GDAL reads (GeoTIFF, COG, VRT, JP2, ...) becomes a table of windows
(TorchGeo's `GridGeoSampler` on the data side), read one window at a time:

  Grid.parse(tile="256", stride="128")             windows of 256 x 256 scene pixels, every
                                                    128 pixels
  Grid.parse(tile="256", stride="128", gsd="10")   256 x 256 output pixels of 10 m each
                                                    (2,560 m on the ground), every 1,280 m,
                                                    in every scene whatever its resolution
  Grid.parse(tile="2560m", stride="1280m")         the same ground sizes, read at each
                                                    scene's own resolution

Windows: offsets 0, stride, 2 x stride, ... and, when the last one stops short of the
edge, one more flush with the edge, so every pixel is in a window and no window is cut
(a scene smaller than one window is an error naming it). Windows whose pixels are all
nodata (the raster's nodata value or mask, in every band read) are left out before any
encoding: the scene's mask is read once in strips of rows (bounded memory) into a map of
16 x 16 blocks; a window with a valid block wholly inside it is kept, one without any
valid block touching it is dropped, and only the few in between have their own mask read.

Reads: each window is read on its own (rasterio windows; nothing ever reads a scene
whole), resampled to the output size when it differs (average when shrinking, which GDAL
serves from a COG's overviews where it has them; bilinear when enlarging), then scaled to
8 bits by the table's `rasters.RasterSpec` like any raster. Scenes of different CRSs and
resolutions live in one archive: each is cut in its own CRS, and with `gsd` every window
covers the same ground size at the same output resolution. Ground units in a projected CRS
are its linear unit converted (metres, feet); in a geographic CRS (degrees) a scene is cut
at the ground scale of its central latitude (WGS84 ellipsoid), allowed where a degree of
longitude changes by at most 1% over the scene's latitudes (about 1 degree of latitude at
45N) and refused by name beyond.

A window is addressed by its tile path, `SCENE#COL,ROW,WIDTH,HEIGHT@OUTWxOUTH` (scene
pixels, output pixels), wherever a path is taken (codes files, `search`, the service).
Its footprint is the window's four corners in the scene's CRS and in WGS84 (lon, lat).
"""

import dataclasses
import math
import os
import re
import threading
from collections import OrderedDict
from typing import List, Optional, Sequence, Tuple

import numpy as np

from rshash_jax import errors
from rshash_jax.data import image_limits, rasters

# What GDAL reads as scenes; other files under a scene folder are ignored.
SCENE_EXTENSIONS = (".tif", ".tiff", ".vrt", ".jp2", ".img")
_TILE = re.compile(r"^(?P<scene>.+)#(\d+),(\d+),(\d+),(\d+)@(\d+)x(\d+)$")
_BLOCK = 16  # the validity map's block, in scene pixels
_STRIP_PIXELS = 1 << 22  # pixels of mask read at once (4 MiB)
MAX_WINDOWS = 1 << 26  # windows of one archive (a table of paths must fit in memory)


def tile_path(scene: str, window: Sequence[int], out: Sequence[int]) -> str:
  c, r, w, h = (int(v) for v in window)
  return f"{scene}#{c},{r},{w},{h}@{int(out[0])}x{int(out[1])}"


def is_tile(path: str) -> bool:
  return isinstance(path, str) and _TILE.match(path) is not None


def parse_tile(path: str) -> Tuple[str, Tuple[int, int, int, int], Tuple[int, int]]:
  """(scene, (col, row, width, height), (out width, out height)) of a tile path."""
  m = _TILE.match(path)
  if m is None:
    raise errors.InvalidInput(f"{path!r} is not a tile path (SCENE#COL,ROW,WIDTH,HEIGHT@OUTWxOUTH)")
  v = [int(x) for x in m.groups()[1:]]
  if min(v[2:]) < 1:
    raise errors.InvalidInput(f"{path!r}: a window and its output need at least one pixel")
  return m.group("scene"), tuple(v[:4]), tuple(v[4:])


def _size(value: str, name: str) -> Tuple[float, str]:
  """'256' -> (256, 'px'); '2560m' -> (2560, 'm')."""
  text = str(value).strip().lower()
  unit = "m" if text.endswith("m") else "px"
  try:
    v = float(text[:-1] if unit == "m" else text)
  except ValueError:
    v = float("nan")
  if not (math.isfinite(v) and v > 0) or (unit == "px" and v != int(v)):
    raise errors.InvalidInput(
      f"--{name}={value!r} is invalid: a whole number of pixels (256) or metres on the "
      "ground (2560m)"
    )
  return v, unit


@dataclasses.dataclass(frozen=True)
class Grid:
  """How scenes are cut: window and stride in output pixels or in metres, and the output
  ground sampling distance (metres per pixel; 0: each scene's own)."""

  tile: float
  stride: float
  unit: str = "px"  # "px" (output pixels) or "m" (metres on the ground)
  gsd: float = 0.0

  @classmethod
  def parse(cls, tile: str, stride: str = "", gsd="") -> "Grid":
    t, unit = _size(tile, "tile")
    s, s_unit = _size(stride, "stride") if str(stride).strip() else (t, unit)
    if s_unit != unit:
      raise errors.InvalidInput(
        f"--tile={tile!r} and --stride={stride!r}: give both in pixels or both in metres"
      )
    g = 0.0
    if str(gsd).strip():
      try:
        g = float(gsd)
      except ValueError:
        g = float("nan")
      if not (math.isfinite(g) and g > 0):
        raise errors.InvalidInput(f"--gsd={gsd!r} is invalid: metres per output pixel, > 0")
    if unit == "px" and t > 1 << 15:
      raise errors.TooLarge(f"--tile={tile!r}: a window of more than {1 << 15} pixels a side")
    return cls(tile=t, stride=s, unit=unit, gsd=g)

  @property
  def ground(self) -> bool:
    """Whether windows are measured on the ground (metres), i.e. need a projected CRS."""
    return self.unit == "m" or self.gsd > 0

  def describe(self) -> str:
    u = "px" if self.unit == "px" else " m"
    g = f" at {self.gsd:g} m/px" if self.gsd else ""
    return f"windows of {self.tile:g}{u} every {self.stride:g}{u}{g}"

  def layout(self, src, name: str):
    """For an open scene: (window w, h and stride x, y in scene pixels, output w, h)."""
    if not self.ground:
      t, s = int(self.tile), int(self.stride)
      return (t, t, s, s), (t, t)
    if src.crs is None or src.transform.is_identity:
      raise errors.InvalidInput(
        f"{name}: has no CRS and transform: windows in metres or at a --gsd need a "
        "georeferenced scene (use --tile/--stride in pixels without --gsd)"
      )
    if src.crs.is_projected:
      metres = float(src.crs.linear_units_factor[1])  # metres per CRS unit
      res_x, res_y = (abs(float(r)) * metres for r in src.res)  # metres per scene pixel
    elif src.crs.is_geographic:
      res_x, res_y = _geographic_res(src, name)
    else:
      raise errors.InvalidInput(
        f"{name}: its CRS ({src.crs.to_string()}) is neither projected nor geographic: "
        "windows in metres or at a --gsd need one that is, or use --tile/--stride in pixels"
      )
    if self.unit == "m":
      tile_m, stride_m = self.tile, self.stride
      out = self.tile / self.gsd if self.gsd else None
    else:
      tile_m, stride_m, out = self.tile * self.gsd, self.stride * self.gsd, self.tile
    win = (max(1, round(tile_m / res_x)), max(1, round(tile_m / res_y)))
    step = (max(1, round(stride_m / res_x)), max(1, round(stride_m / res_y)))
    o = (max(1, round(out)),) * 2 if out else win
    if max(o) > 1 << 15:
      raise errors.TooLarge(f"{name}: windows of {o[0]} x {o[1]} output pixels")
    return (*win, *step), o


# A geographic scene is cut by ground units at one scale for the whole scene: allowed while
# the metres in a degree of longitude change by at most this fraction over its latitudes.
GEOGRAPHIC_SCALE_TOLERANCE = 0.01


def _metres_per_degree(lat_deg: float) -> Tuple[float, float]:
  """(metres per degree of longitude, of latitude) on the WGS84 ellipsoid at a latitude
  (the usual cosine series, accurate to about a centimetre)."""
  p = math.radians(lat_deg)
  lon = 111412.84 * math.cos(p) - 93.5 * math.cos(3 * p) + 0.118 * math.cos(5 * p)
  lat = 111132.92 - 559.82 * math.cos(2 * p) + 1.175 * math.cos(4 * p) - 0.0023 * math.cos(6 * p)
  return lon, lat


def _geographic_res(src, name: str) -> Tuple[float, float]:
  """Metres per scene pixel (x, y) of a scene in a geographic CRS (degrees), at its central
  latitude; refused by name where that scale is not close to constant over the scene."""
  unit = src.crs.units_factor  # (name, radians per unit) of the angular unit
  to_deg = math.degrees(float(unit[1])) if unit and unit[1] else 1.0
  b = src.bounds
  lats = sorted((b.bottom * to_deg, b.top * to_deg))
  if lats[0] < -90 or lats[1] > 90:
    raise errors.InvalidInput(f"{name}: latitudes {lats[0]:g}..{lats[1]:g} are out of range")
  per_lon = [_metres_per_degree(v)[0] for v in (lats[0], lats[1], sum(lats) / 2)]
  spread = (max(per_lon[:2]) - min(per_lon[:2])) / max(per_lon[2], 1e-9)
  if lats[0] < -89 or lats[1] > 89 or spread > GEOGRAPHIC_SCALE_TOLERANCE:
    raise errors.InvalidInput(
      f"{name}: its CRS ({src.crs.to_string()}) is geographic and the scene spans latitudes "
      f"{lats[0]:.3f}..{lats[1]:.3f}, over which a degree of longitude changes by "
      f"{100 * spread:.1f}% on the ground (at most {100 * GEOGRAPHIC_SCALE_TOLERANCE:g}%): "
      "windows in metres or at a --gsd need a projected CRS for it (reproject it, e.g. "
      "gdalwarp -t_srs EPSG:32633), or use --tile/--stride in pixels without --gsd"
    )
  lon_m, lat_m = _metres_per_degree(sum(lats) / 2)
  return abs(float(src.res[0])) * to_deg * lon_m, abs(float(src.res[1])) * to_deg * lat_m


def _offsets(size: int, win: int, step: int) -> np.ndarray:
  out = list(range(0, size - win + 1, step))
  if out[-1] + win < size:
    out.append(size - win)  # flush with the edge: every pixel in a window
  return np.asarray(out, np.int64)


@dataclasses.dataclass
class Tiles:
  """The windows of a scene archive, one row per window (the table's rows, in order)."""

  scenes: List[str]  # scene paths
  crs: List[str]  # each scene's CRS as WKT ("" without one)
  scene: np.ndarray  # int32 [N]: index into `scenes`
  window: np.ndarray  # int64 [N, 4]: col, row, width, height in scene pixels
  out: np.ndarray  # int32 [N, 2]: output width, height
  corners: np.ndarray  # float64 [N, 4, 2]: the window's corners in the scene's CRS
  footprint: np.ndarray  # float64 [N, 4, 2]: the same corners in WGS84 (lon, lat); NaN none
  centre: np.ndarray  # float64 [N, 2]: the window's centre in WGS84 (lon, lat); NaN none
  skipped: int = 0  # windows left out as nodata only

  def __len__(self) -> int:
    return len(self.scene)

  def paths(self) -> List[str]:
    return [tile_path(self.scenes[s], w, o) for s, w, o in zip(self.scene, self.window, self.out)]


def scene_paths(data: str) -> List[str]:
  """A scene file, a folder (every raster under it, sorted) or a text file listing scene
  paths (one per line; relative to the list's folder)."""
  if os.path.isdir(data):
    root = os.path.abspath(data)
    found = sorted(
      os.path.join(d, f)
      for d, _, fs in os.walk(root)
      for f in fs
      if f.lower().endswith(SCENE_EXTENSIONS)
    )
    if not found:
      raise errors.InvalidInput(f"no scenes ({'/'.join(SCENE_EXTENSIONS)}) under {root}")
    return found
  if not os.path.isfile(data):
    raise errors.NotFound(f"scene archive not found: {data}")
  if data.lower().endswith(SCENE_EXTENSIONS):
    return [os.path.abspath(data)]
  base = os.path.dirname(os.path.abspath(data))
  with open(data, encoding="utf-8", errors="replace") as f:
    lines = [ln.strip() for ln in f.read(1 << 24).splitlines()]
  out = [os.path.join(base, ln) for ln in lines if ln and not ln.startswith("#")]
  if not out:
    raise errors.InvalidInput(f"{data}: lists no scenes (one raster path per line)")
  for p in out:
    if not os.path.isfile(p):
      raise errors.NotFound(f"{data}: lists {p}, which does not exist")
  return out


def _valid_windows(src, bands: Tuple[int, ...], cols, rows, win, name: str) -> np.ndarray:
  """bool [rows, cols]: whether each window holds a valid pixel in some band read."""
  from rasterio.enums import MaskFlags  # pylint: disable=g-import-not-at-top
  from rasterio.windows import Window  # pylint: disable=g-import-not-at-top

  flags = [src.mask_flag_enums[b - 1] for b in bands]
  if all(f == [MaskFlags.all_valid] for f in flags):
    return np.ones((len(rows), len(cols)), bool)
  b = _BLOCK
  bw, bh = -(-src.width // b), -(-src.height // b)
  any_valid = np.zeros((bh, bw), bool)
  strip = max(b, (_STRIP_PIXELS // max(src.width, 1)) // b * b)
  for r0 in range(0, src.height, strip):
    h = min(strip, src.height - r0)
    try:
      m = _mask(src, bands, Window(0, r0, src.width, h))
    except errors.UserError:
      raise
    except Exception as e:  # a corrupt block
      raise errors.NotAnImage(f"unreadable block in {name}, rows {r0}..{r0 + h}: {e}") from None
    ph, pw = -(-h // b) * b, bw * b
    padded = np.zeros((ph, pw), bool)
    padded[:h, : src.width] = m
    any_valid[r0 // b : r0 // b + ph // b] = padded.reshape(ph // b, b, bw, b).any(axis=(1, 3))
  # Summed-area table of valid blocks: counts of blocks inside / touching each window.
  sat = np.zeros((bh + 1, bw + 1), np.int64)
  sat[1:, 1:] = any_valid.cumsum(0).cumsum(1)

  def count(y0, x0, y1, x1):  # valid blocks in [y0, y1) x [x0, x1), per window
    y1, x1 = np.maximum(y1, y0), np.maximum(x1, x0)
    return sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]

  w, h = win
  r, c = np.meshgrid(rows, cols, indexing="ij")
  inside = count(-(-r // b), -(-c // b), (r + h) // b, (c + w) // b)
  touching = count(r // b, c // b, -(-(r + h) // b), -(-(c + w) // b))
  keep = (inside > 0) | (touching > 0)
  # Windows that touch valid blocks but hold none whole: their own mask decides.
  for i, j in zip(*np.nonzero((inside == 0) & (touching > 0))):
    window = Window(int(cols[j]), int(rows[i]), w, h)
    keep[i, j] = bool(_mask(src, bands, window).any())
  return keep


def _mask(src, bands, window) -> np.ndarray:
  """bool [h, w]: valid in at least one of `bands` (rasterio's per-band masks)."""
  m = src.read_masks(list(bands), window=window)
  return (m > 0).any(axis=0)


def scene_tiles(
  paths: Sequence[str], grid: Grid, spec: Optional[rasters.RasterSpec] = None
) -> Tuple[Tiles, rasters.RasterSpec]:
  """Every window of every scene (see the module docstring), with the raster spec
  resolved on the first scene (data.bands=all's band count, the band numbers): each
  scene's header is checked against it (bands present, type scalable) before any pixel
  is encoded."""
  spec = spec or rasters.RasterSpec()
  crs_list, parts = [], []
  total = 0
  skipped = 0
  for si, path in enumerate(paths):
    with rasters.open_raster(path) as src:
      bands = rasters.checked_bands(src, spec, path)
      if spec.all_bands and not spec.count:
        spec = spec.with_count(src.count, path)
      if not spec.numbers:
        spec = dataclasses.replace(spec, numbers=bands)
      (w, h, sx, sy), out = grid.layout(src, path)
      if w > src.width or h > src.height:
        raise errors.InvalidInput(
          f"{path}: the scene ({src.width} x {src.height} px) is smaller than one window "
          f"({w} x {h} px, {grid.describe()})"
        )
      cols, rows = _offsets(src.width, w, sx), _offsets(src.height, h, sy)
      total += len(cols) * len(rows)
      if total > MAX_WINDOWS:
        raise errors.TooLarge(
          f"{path}: the archive gives more than {MAX_WINDOWS} windows ({grid.describe()})"
        )
      keep = _valid_windows(src, bands, cols, rows, (w, h), path)
      skipped += int((~keep).sum())
      rr, cc = np.nonzero(keep)
      win = np.stack([cols[cc], rows[rr], np.full(len(rr), w), np.full(len(rr), h)], axis=1).astype(
        np.int64
      )
      georef = src.crs is not None and not src.transform.is_identity
      crs_list.append(src.crs.to_wkt() if georef else "")
      corners, footprint, centre = _footprints(src.transform, crs_list[-1], win, path)
      parts.append((si, win, out, corners, footprint, centre))
  if not sum(len(p[1]) for p in parts):
    raise errors.InvalidInput(f"every window of the {len(paths)} scene(s) is nodata only")
  tiles = Tiles(
    scenes=[os.path.abspath(p) for p in paths],
    crs=crs_list,
    scene=np.concatenate([np.full(len(p[1]), p[0], np.int32) for p in parts]),
    window=np.concatenate([p[1] for p in parts]),
    out=np.concatenate([np.tile(np.asarray(p[2], np.int32), (len(p[1]), 1)) for p in parts]),
    corners=np.concatenate([p[3] for p in parts]),
    footprint=np.concatenate([p[4] for p in parts]),
    centre=np.concatenate([p[5] for p in parts]),
    skipped=skipped,
  )
  return tiles, spec


def _footprints(transform, wkt: str, win: np.ndarray, name: str):
  """Corners [N, 4, 2] in the scene's CRS (pixel coordinates without one), the same in
  WGS84 and the centre in WGS84 (NaN without a CRS)."""
  c, r, w, h = (win[:, i].astype(np.float64) for i in range(4))
  px = np.stack([c, c + w, c + w, c], axis=1)  # corners clockwise from the top left
  py = np.stack([r, r, r + h, r + h], axis=1)
  a = transform
  xs = a.a * px + a.b * py + a.c
  ys = a.d * px + a.e * py + a.f
  corners = np.stack([xs, ys], axis=-1)
  n = len(win)
  if not wkt:
    return corners, np.full((n, 4, 2), np.nan), np.full((n, 2), np.nan)
  t = rasters.to_wgs84(wkt)
  lon, lat = t.transform(xs.ravel(), ys.ravel())
  footprint = np.stack([np.asarray(lon), np.asarray(lat)], axis=-1).reshape(n, 4, 2)
  cx, cy = c + w / 2, r + h / 2
  clon, clat = t.transform(a.a * cx + a.b * cy + a.c, a.d * cx + a.e * cy + a.f)
  centre = np.stack([np.asarray(clon, np.float64), np.asarray(clat, np.float64)], axis=-1)
  if not (np.isfinite(footprint).all() and np.isfinite(centre).all()):
    raise errors.InvalidInput(
      f"{name}: its CRS cannot be transformed to WGS84 for every window (coordinates "
      f"{xs.min():.6g}..{xs.max():.6g}, {ys.min():.6g}..{ys.max():.6g}): check its "
      "georeferencing"
    )
  return corners, footprint, centre.reshape(n, 2)


class _OpenScenes(threading.local):
  """A few open datasets per thread (rasterio datasets are not shared across threads):
  a window's read does not re-open and re-parse its scene's header."""

  def __init__(self):
    super().__init__()
    self.open: "OrderedDict[str, object]" = OrderedDict()

  def get(self, path: str):
    src = self.open.pop(path, None)
    if src is None:
      src = rasters.open_raster(path)
      while len(self.open) >= 4:
        self.open.popitem(last=False)[1].close()
    self.open[path] = src
    return src


_SCENES = _OpenScenes()


def read_tile(path: str, spec: Optional[rasters.RasterSpec] = None) -> np.ndarray:
  """A tile path's window, uint8 [OUTH, OUTW, 3] ([.., C] under data.bands=all), read on
  its own and scaled like any raster. Errors name the scene and the window."""
  from rasterio.enums import Resampling  # pylint: disable=g-import-not-at-top
  from rasterio.windows import Window  # pylint: disable=g-import-not-at-top

  spec = spec or rasters.RasterSpec()
  scene, (c, r, w, h), (ow, oh) = parse_tile(path)
  if not os.path.isfile(scene):
    raise errors.NotFound(f"scene not found: {scene} (of tile {path})")
  src = _SCENES.get(scene)
  if c + w > src.width or r + h > src.height:
    raise errors.InvalidInput(
      f"{scene}: window {c},{r} of {w} x {h} px goes past the scene's edge "
      f"({src.width} x {src.height} px)"
    )
  bands = rasters.checked_bands(src, spec, scene)
  image_limits.check(path, ow, oh, len(bands), 4)
  if (ow, oh) == (w, h):
    resampling = Resampling.nearest
  else:
    resampling = Resampling.average if ow * oh < w * h else Resampling.bilinear
  try:
    data = src.read(
      list(bands),
      window=Window(c, r, w, h),
      out_shape=(len(bands), oh, ow),
      resampling=resampling,
      masked=True,
      out_dtype="float32",
    )
  except Exception as e:  # a corrupt or truncated block
    raise errors.NotAnImage(
      f"unreadable block in {scene}, window {c},{r} of {w} x {h} px: {e}"
    ) from None
  return rasters.to_uint8(data, spec, path)


def spatial_index(footprint: Optional[np.ndarray], lon: np.ndarray, lat: np.ndarray):
  """(shapely STRtree, ids): footprints [N, 4, 2] as polygons where given and finite,
  else centres as points; entries without coordinates are left out. `tree.query(g,
  predicate="intersects")` returns positions into `ids`."""
  import shapely  # pylint: disable=g-import-not-at-top

  lon, lat = np.asarray(lon, np.float64), np.asarray(lat, np.float64)
  has_fp = np.zeros(len(lon), bool)
  geoms, ids = [], []
  if footprint is not None:
    fp = np.asarray(footprint, np.float64)
    has_fp = np.isfinite(fp).all(axis=(1, 2))
    rows = np.nonzero(has_fp)[0]
    geoms.append(shapely.polygons(np.concatenate([fp[rows], fp[rows, :1]], axis=1)))
    ids.append(rows)
  pts = np.nonzero(~has_fp & np.isfinite(lon) & np.isfinite(lat))[0]
  geoms.append(shapely.points(lon[pts], lat[pts]))
  ids.append(pts)
  return shapely.STRtree(np.concatenate(geoms)), np.concatenate(ids)


MAX_LABEL_BYTES = 1 << 30  # a label file read whole (GeoJSON has no index)


def read_labels(path: str, field: str):
  """A label file (GeoJSON, GeoPackage, Shapefile, FlatGeobuf: anything OGR reads, through
  pyogrio, geopandas' own reader) -> (WGS84 shapely geometries [M], class names [M]).
  Errors name the file, the field and the feature."""
  import pyogrio  # pylint: disable=g-import-not-at-top
  import pyogrio.raw  # pylint: disable=g-import-not-at-top
  import shapely  # pylint: disable=g-import-not-at-top

  if not os.path.exists(path):
    raise errors.NotFound(f"data.scene_labels: file not found: {path}")
  if os.path.isfile(path) and os.path.getsize(path) > MAX_LABEL_BYTES:
    raise errors.TooLarge(f"data.scene_labels: {path} is over {MAX_LABEL_BYTES >> 20} MiB")
  try:
    meta, _, wkb, fields = pyogrio.raw.read(path)
  except Exception as e:  # pyogrio.errors.DataSourceError and friends
    raise errors.InvalidInput(f"data.scene_labels: cannot read {path} ({e})") from None
  names = [str(n) for n in meta["fields"]]
  if field not in names:
    raise errors.InvalidInput(
      f"data.scene_labels: {path} has no field {field!r} (data.scene_label_field); its "
      f"fields: {', '.join(names) or '(none)'}"
    )
  if wkb is None or not len(wkb):
    raise errors.InvalidInput(f"data.scene_labels: {path} holds no geometry")
  geoms = shapely.from_wkb(wkb)
  classes = fields[names.index(field)]
  for i, (g, c) in enumerate(zip(geoms, classes)):
    if g is None or g.is_empty:
      raise errors.InvalidInput(f"data.scene_labels: {path}, feature {i} has no geometry")
    if c is None or (isinstance(c, float) and not np.isfinite(c)) or not str(c).strip():
      raise errors.InvalidInput(f"data.scene_labels: {path}, feature {i} has no {field!r}")
    if g.geom_type not in ("Point", "MultiPoint", "Polygon", "MultiPolygon"):
      raise errors.InvalidInput(
        f"data.scene_labels: {path}, feature {i} is a {g.geom_type}: points or polygons only"
      )
  crs = meta.get("crs") or "EPSG:4326"
  from pyproj import CRS  # pylint: disable=g-import-not-at-top

  if not CRS.from_user_input(crs).equals(CRS.from_epsg(4326), ignore_axis_order=True):
    t = rasters.to_wgs84(CRS.from_user_input(crs).to_wkt())
    geoms = shapely.transform(geoms, lambda xy: np.stack(t.transform(xy[:, 0], xy[:, 1]), 1))
  return geoms, np.asarray([str(c).strip() for c in classes])


def label_windows(tiles: Tiles, geoms, classes: np.ndarray, path: str):
  """Each window's class from label geometries (WGS84): the polygon(s) holding the window's
  centre, else the points inside its footprint; a window whose labels disagree, or that
  has none, gets "" (left out of training). Every geometry must touch some scene:
  one that lies outside all of them is an error naming it."""
  import shapely  # pylint: disable=g-import-not-at-top

  fp = tiles.footprint
  if not np.isfinite(fp).all():
    raise errors.InvalidInput(
      "data.scene_labels: labels need georeferenced scenes (a scene has no CRS)"
    )
  polys = shapely.polygons(np.concatenate([fp, fp[:, :1]], axis=1))
  centres = shapely.points(tiles.centre)
  out = np.full(len(tiles), "", dtype=object)
  conflict = np.zeros(len(tiles), bool)
  tree = shapely.STRtree(polys)
  for i, (g, c) in enumerate(zip(geoms, classes)):
    hit = tree.query(g, predicate="intersects")
    if not len(hit):
      raise errors.InvalidInput(
        f"data.scene_labels: {path}, feature {i} ({c!r}, {g.geom_type} at "
        f"{g.representative_point().x:.5f}, {g.representative_point().y:.5f}) lies outside "
        "every window of every scene"
      )
    if g.geom_type in ("Polygon", "MultiPolygon"):
      hit = hit[shapely.contains(g, centres[hit]) | shapely.touches(g, centres[hit])]
    for w in hit:
      if out[w] and out[w] != c:
        conflict[w] = True
      out[w] = c
  out[conflict] = ""
  return out.astype(str), int(conflict.sum())


def take(tiles: Tiles, rows: np.ndarray) -> Tiles:
  """The windows `rows` of `tiles`, in that order."""
  return dataclasses.replace(
    tiles,
    scene=tiles.scene[rows],
    window=tiles.window[rows],
    out=tiles.out[rows],
    corners=tiles.corners[rows],
    footprint=tiles.footprint[rows],
    centre=tiles.centre[rows],
  )
