"""GeoTIFF / TIFF rasters through rasterio: band choice, reflectance scaling, coordinates.

Every `.tif` / `.tiff` an image table names is read here (class folders, `encode`,
`search`, MrHash `folder:DIR` sources), not through PIL: Sentinel-2, Landsat and aerial
orthophotos come with more than 3 bands, 16-bit or float values, nodata and a CRS.

  data.bands   "" (default): a 3-band raster's bands 1,2,3; of a raster with more bands,
               those its colour interpretation tags red, green and blue (an RGBA or
               RGB + NIR orthophoto), and otherwise it is refused (which three of a
               Sentinel-2 tile's 13 are R, G, B? bands 1-3 are B1, B2, B3); band 1 of a
               one- or two-band raster (repeated as grey). "4,3,2": band numbers counted
               from 1 as GDAL and rasterio count them; "B4,B3,B2": the rasters' band
               descriptions. The chosen bands feed the backbone's R, G, B in that order
               (1 or 3 bands).
               "all", "all:4,3,2" or "all:B4,B3,B2": every band of the raster. The three
               named (default 1,2,3) come first and take the pretrained R, G, B filters of
               the backbone's stem; the other bands follow in raster order and take the
               mean of those filters; the whole stem kernel is then scaled by 3 / C (C
               bands), so that an input whose bands all carry the same values gives the
               pretrained stem's activation (timm's `adapt_input_conv` convention). Every
               image of the archive must then have the same band count (checked on every
               header), stored in the encoder with the bands' order.
  data.scale   "" (default): 8-bit rasters as they are; other data types are refused
               (their range is unknown) with a message naming the file.
               "10000" (any number): reflectance / that number * 255 (Sentinel-2 L2A: 10000).
               "stretch" or "stretch:LO,HI": per band, the LO-th and HI-th percentiles
               (default 2, 98) of the training split's valid pixels map to 0 and 255;
               computed once on the training split only and stored in the trained
               encoder, so that `encode`, `search` and `load_encoder` apply the same one.
Values keep their type until scaling (float32 arithmetic); nodata pixels (the raster's
nodata value or mask) are left out of the percentiles and come out 0; a tile with no
valid pixel is an error. After scaling, values are clipped to 0..255 and rounded to uint8:
from there on a raster is an image like any other (with C channels under data.bands=all).

Coordinates: `center_lonlat(path)` is the centre pixel's position (transform + CRS,
converted to WGS84 longitude / latitude with pyproj); rasters without a transform or CRS
have none (NaN), nothing is invented.
"""

import dataclasses
import functools
from typing import Optional, Sequence, Tuple

import numpy as np

from rshash_jax import errors
from rshash_jax.data import image_limits

RASTER_EXTENSIONS = (".tif", ".tiff")
STRETCH_DEFAULT = (2.0, 98.0)


def is_raster(path: str) -> bool:
  return path.lower().endswith(RASTER_EXTENSIONS)


@dataclasses.dataclass(frozen=True)
class RasterSpec:
  """How a raster becomes 8-bit RGB: which bands, and how values are scaled."""

  bands: Tuple = ()  # () default; ints (1-based) or description strings
  divisor: float = 0.0  # >0: value / divisor * 255
  stretch: Tuple[float, float] = ()  # (lo, hi) percentiles: a per-band stretch
  low: Tuple[float, ...] = ()  # the stretch's per-band values, once fitted
  high: Tuple[float, ...] = ()
  all_bands: bool = False  # data.bands=all[:R,G,B]: `bands` are the three for R, G, B
  count: int = 0  # all_bands: the archive's band count, once resolved
  numbers: Tuple[
    int, ...
  ] = ()  # the bands read, as numbers, on the training archive's first raster

  @classmethod
  def parse(cls, bands: str = "", scale: str = "") -> "RasterSpec":
    """From config strings (data.bands, data.scale); errors name the field and value."""
    spec_bands: Tuple = ()
    given = bands.strip()
    all_bands = given == "all" or given.startswith("all:")
    if all_bands:
      bands = given[len("all:") :]
      if given.startswith("all:") and not bands.strip():
        raise errors.InvalidInput(
          f"config.data.bands={given!r} is invalid: expected all or all:R,G,B"
        )
    if bands.strip():
      items = [b.strip() for b in bands.split(",")]
      if any(not b for b in items):
        raise errors.InvalidInput(f"config.data.bands={bands!r} is invalid: an empty item")
      if all(b.isdigit() for b in items):
        spec_bands = tuple(int(b) for b in items)
        if min(spec_bands) < 1:
          raise errors.InvalidInput(
            f"config.data.bands={bands!r} is invalid: band numbers count from 1"
          )
      elif any(b.isdigit() for b in items):
        raise errors.InvalidInput(
          f"config.data.bands={bands!r} is invalid: use band numbers (4,3,2) or band "
          "descriptions (B4,B3,B2), not both"
        )
      else:
        spec_bands = tuple(items)
      if all_bands and len(spec_bands) != 3:
        raise errors.InvalidInput(
          f"config.data.bands='all:{bands}' is invalid: all:R,G,B names the 3 bands "
          f"that take the pretrained R, G, B filters, got {len(spec_bands)}"
        )
      if len(spec_bands) not in (1, 3):
        raise errors.InvalidInput(
          f"config.data.bands={bands!r} selects {len(spec_bands)} bands: an RGB "
          "backbone takes 3 (or 1, repeated as grey); data.bands=all feeds every band"
        )
      if all_bands and len(set(spec_bands)) != len(spec_bands):
        raise errors.InvalidInput(f"config.data.bands='all:{bands}' names a band twice")
    if all_bands:
      return dataclasses.replace(cls.parse("", scale), bands=spec_bands, all_bands=True)
    scale = scale.strip()
    if not scale:
      return cls(bands=spec_bands)
    if scale == "stretch" or scale.startswith("stretch:"):
      lo, hi = STRETCH_DEFAULT
      if ":" in scale:
        try:
          lo, hi = (float(x) for x in scale.split(":", 1)[1].split(","))
        except ValueError:
          raise errors.InvalidInput(
            f"config.data.scale={scale!r} is invalid: expected stretch:LO,HI "
            "(percentiles, e.g. stretch:2,98)"
          ) from None
      if not 0 <= lo < hi <= 100:
        raise errors.InvalidInput(
          f"config.data.scale={scale!r} is invalid: need 0 <= LO < HI <= 100"
        )
      return cls(bands=spec_bands, stretch=(lo, hi))
    try:
      divisor = float(scale)
    except ValueError:
      divisor = 0.0
    if not divisor > 0:
      raise errors.InvalidInput(
        f"config.data.scale={scale!r} is invalid: expected '' (8-bit as is), a "
        "positive divisor such as 10000, or stretch[:LO,HI]"
      )
    return cls(bands=spec_bands, divisor=divisor)

  @property
  def is_default(self) -> bool:
    """Bands 1,2,3 (or 1) of 8-bit rasters, as they are: no data.bands / data.scale."""
    return dataclasses.replace(self, numbers=()) == RasterSpec()

  @property
  def needs_fit(self) -> bool:
    return bool(self.stretch) and not self.low

  @property
  def channels(self) -> int:
    """Channels of the images this spec gives: 3 (RGB), or every band under data.bands=all."""
    if self.all_bands and not self.count:
      raise errors.InvalidInput(
        "data.bands=all: the band count has not been read from the rasters yet"
      )
    return self.count if self.all_bands else 3

  def with_count(self, count: int, name: str) -> "RasterSpec":
    """data.bands=all: this spec with the archive's band count, read from `name`."""
    if count < 3:
      raise errors.InvalidInput(
        f"{name}: data.bands=all needs rasters of 3 or more bands, this one has {count}"
      )
    return dataclasses.replace(self, count=int(count))

  def to_meta(self) -> dict:
    return {
      "bands": list(self.bands),
      "divisor": self.divisor,
      "stretch": list(self.stretch),
      "low": list(self.low),
      "high": list(self.high),
      "all_bands": self.all_bands,
      "count": self.count,
      "numbers": list(self.numbers),
    }

  @classmethod
  def from_meta(cls, meta: Optional[dict]) -> "RasterSpec":
    if not meta:
      return cls()
    return cls(
      bands=tuple(meta["bands"]),
      divisor=float(meta["divisor"]),
      stretch=tuple(meta["stretch"]),
      low=tuple(meta["low"]),
      high=tuple(meta["high"]),
      all_bands=bool(meta.get("all_bands", False)),
      count=int(meta.get("count", 0)),
      numbers=tuple(meta.get("numbers", ())),
    )

  def describe(self) -> str:
    bands = ",".join(map(str, self.bands)) or "default"
    if self.all_bands:
      bands = f"all {self.count or '?'} ({bands} as R,G,B)"
    if self.divisor:
      return f"bands {bands}, value / {self.divisor:g} * 255"
    if self.stretch:
      fitted = (
        f" = {[round(x, 3) for x in self.low]}..{[round(x, 3) for x in self.high]}"
        if self.low
        else ""
      )
      return f"bands {bands}, percentile stretch {self.stretch[0]:g}..{self.stretch[1]:g}{fitted}"
    return f"bands {bands}, 8-bit as is"


def _band_indexes(src, spec: RasterSpec, path: str) -> Tuple[int, ...]:
  if spec.all_bands:
    if spec.count and src.count != spec.count:
      raise errors.InvalidInput(
        f"{path}: has {src.count} band(s); data.bands=all here takes {spec.count} "
        "(the band count of the training archive)"
      )
    if src.count < 3:
      raise errors.InvalidInput(
        f"{path}: data.bands=all needs rasters of 3 or more bands, this one has {src.count}"
      )
    rgb = _band_indexes(
      src, dataclasses.replace(spec, all_bands=False, bands=spec.bands or (1, 2, 3)), path
    )
    return rgb + tuple(b for b in range(1, src.count + 1) if b not in rgb)
  if not spec.bands:
    return _default_bands(src, path)
  if isinstance(spec.bands[0], int):
    past = [b for b in spec.bands if b > src.count]
    if past:
      raise errors.InvalidInput(
        f"{path}: data.bands asks for band {past[0]} but the raster has {src.count} band(s)"
      )
    return tuple(spec.bands)
  names = [d or "" for d in src.descriptions]
  out = []
  for b in spec.bands:
    if b not in names:
      have = ", ".join(n or "(none)" for n in names)
      raise errors.InvalidInput(
        f"{path}: data.bands asks for band {b!r}, not among the raster's band descriptions: {have}"
      )
    out.append(names.index(b) + 1)
  return tuple(out)


def _default_bands(src, path: str) -> Tuple[int, ...]:
  """Bands an RGB encoder reads without data.bands: see the module docstring."""
  if src.count <= 2:
    return (1,)
  if src.count == 3:
    return (1, 2, 3)
  from rasterio.enums import ColorInterp  # pylint: disable=g-import-not-at-top

  interp = list(src.colorinterp)
  want = (ColorInterp.red, ColorInterp.green, ColorInterp.blue)
  if all(c in interp for c in want):
    return tuple(interp.index(c) + 1 for c in want)
  raise errors.Incompatible(
    f"{path}: has {src.count} bands and no red/green/blue colour interpretation; this "
    "encoder takes 3 bands: say which (data.bands=4,3,2 or band descriptions such as "
    "B4,B3,B2 when training; the encoder then reads the same bands), or data.bands=all"
  )


def open_raster(path: str):
  """rasterio.open, with an unreadable file an InvalidInput naming it."""
  import warnings  # pylint: disable=g-import-not-at-top
  import rasterio  # pylint: disable=g-import-not-at-top

  try:
    with warnings.catch_warnings():  # a plain TIFF is fine: it just has no coordinates
      warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
      return rasterio.open(path)
  except Exception as e:  # rasterio.errors.RasterioIOError and friends
    raise errors.NotAnImage(f"corrupt or unreadable raster: {path} ({e})") from None


def checked_bands(src, spec: RasterSpec, path: str) -> Tuple[int, ...]:
  """The band indexes `spec` picks from the open raster `src`, after checking that they
  exist and that their type can be scaled to 0..255."""
  idx = _band_indexes(src, spec, path)
  if not spec.divisor and not spec.stretch and src.dtypes[idx[0] - 1] != "uint8":
    raise errors.Incompatible(
      f"{path}: a {src.dtypes[idx[0] - 1]} raster needs data.scale (a divisor such as "
      "10000 for reflectance, or stretch): its values have no fixed 0..255 range"
    )
  return idx


def check(path: str, spec: RasterSpec) -> Tuple[int, Tuple[int, ...]]:
  """Header checks before any long work: readable, the bands exist, the type can be scaled.
  Returns the raster's band count and the numbers of the bands `spec` reads from it."""
  count, numbers, _ = header(path, spec)
  return count, numbers


def header(path: str, spec: RasterSpec) -> Tuple[int, Tuple[int, ...], Tuple[float, float]]:
  """`check`, and the centre's WGS84 (lon, lat) (`center_lonlat`), from one opening."""
  with open_raster(path) as src:
    return src.count, checked_bands(src, spec, path), _lonlat(src)


def read_bands(path: str, spec: RasterSpec) -> np.ma.MaskedArray:
  """The chosen bands as float32 [C, H, W], masked where nodata."""
  with open_raster(path) as src:
    return _read_open(src, spec, path)


def _read_open(
  src, spec: RasterSpec, name: str, max_bytes: Optional[int] = None
) -> np.ma.MaskedArray:
  idx = checked_bands(src, spec, name)
  image_limits.check_raster(src, len(idx), name, max_bytes)
  try:
    data = src.read(idx, masked=True, out_dtype="float32")
  except Exception as e:  # a truncated or corrupt block
    raise errors.NotAnImage(f"corrupt or unreadable raster: {name} ({e})") from None
  if np.ma.getmaskarray(data).all():
    raise errors.InvalidInput(f"{name}: every pixel of bands {idx} is nodata: nothing to encode")
  return data


def read(path: str, spec: RasterSpec) -> np.ndarray:
  """A raster as uint8 [H, W, 3] for an RGB backbone, [H, W, C] under data.bands=all (see
  the module docstring)."""
  return to_uint8(read_bands(path, spec), spec, path)


def to_uint8(data: np.ma.MaskedArray, spec: RasterSpec, name: str) -> np.ndarray:
  """Chosen bands [C, H, W] (masked where nodata) -> uint8 [H, W, 3] (one band repeated as
  grey), or [H, W, C] under data.bands=all, by `spec`'s scaling."""
  if spec.divisor:
    x = data.filled(0.0) / spec.divisor * 255.0
  elif spec.stretch:
    if not spec.low:
      raise errors.InvalidInput(
        f"{name}: data.scale=stretch has not been fitted on a training split"
      )
    if len(spec.low) != data.shape[0]:
      raise errors.InvalidInput(
        f"{name}: the stretch has {len(spec.low)} band(s), the image gives {data.shape[0]}"
      )
    lo = np.asarray(spec.low, np.float32)[:, None, None]
    hi = np.asarray(spec.high, np.float32)[:, None, None]
    x = (data.filled(0.0) - lo) / np.maximum(hi - lo, 1e-12) * 255.0
  else:  # 8-bit (read_bands refuses other types without a scale)
    x = data.filled(0.0)
  x = np.where(np.ma.getmaskarray(data), 0.0, x)
  img = np.clip(np.round(x), 0, 255).astype(np.uint8).transpose(1, 2, 0)
  return np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img


def array_band_numbers(c: int, spec: RasterSpec, name: str) -> Tuple[int, ...]:
  """The band numbers `spec` reads from an in-memory image of `c` bands (no descriptions)."""
  if spec.bands and not isinstance(spec.bands[0], int):
    raise errors.InvalidInput(
      f"{name}: data.bands={','.join(spec.bands)} names band descriptions, which "
      "TFDS examples do not have: use band numbers (e.g. 4,3,2)"
    )
  if not spec.bands and not spec.all_bands and c > 3:
    raise errors.Incompatible(
      f"{name}: the images have {c} bands; this encoder takes 3: say which "
      "(data.bands=4,3,2), or data.bands=all"
    )
  idx = spec.bands or ((1, 2, 3) if c >= 3 else (1,))
  if spec.all_bands:
    if spec.count and c != spec.count:
      raise errors.InvalidInput(
        f"{name}: the images have {c} band(s); data.bands=all here takes {spec.count}"
      )
    idx = tuple(idx) + tuple(b for b in range(1, c + 1) if b not in idx)
  past = [b for b in idx if b > c]
  if past:
    raise errors.InvalidInput(
      f"{name}: data.bands asks for band {past[0]} but the images have {c} band(s)"
    )
  return tuple(idx)


def select_array_bands(array: np.ndarray, spec: RasterSpec, name: str) -> np.ma.MaskedArray:
  """An in-memory image [H, W, C] (a TFDS example) -> its chosen bands [C', H, W] float32.
  Arrays have no band descriptions: bands are numbers here."""
  idx = array_band_numbers(array.shape[-1], spec, name)
  return np.ma.masked_invalid(
    np.moveaxis(array[..., [b - 1 for b in idx]].astype(np.float32), -1, 0)
  )


def read_bytes(
  data: bytes, spec: RasterSpec, name: str = "upload", max_bytes: Optional[int] = None
) -> np.ndarray:
  """A TIFF's contents (an upload) read exactly as a file is (`read`), in memory (rasterio's
  MemoryFile: nothing is written to disk), its header checked against `max_bytes`
  (image_limits); errors name `name`."""
  import warnings  # pylint: disable=g-import-not-at-top
  import rasterio  # pylint: disable=g-import-not-at-top
  from rasterio.io import MemoryFile  # pylint: disable=g-import-not-at-top

  with MemoryFile(data) as mem:
    try:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        src = mem.open()
    except Exception as e:  # rasterio.errors.RasterioIOError and friends
      raise errors.NotAnImage(f"corrupt or unreadable raster: {name} ({e})") from None
    with src:
      return to_uint8(_read_open(src, spec, name, max_bytes), spec, name)


def fit_stretch(
  paths: Sequence[str], spec: RasterSpec, max_files: int = 256, seed: int = 0
) -> RasterSpec:
  """The stretch's per-band percentiles over (a seeded sample of) `paths`' valid pixels:
  call it with the training split's paths only."""
  rasters = [p for p in paths if is_raster(p)]
  if not rasters:
    raise errors.InvalidInput(
      "data.scale=stretch needs GeoTIFF/TIFF images in the training split; it has none"
    )
  if len(rasters) > max_files:
    rasters = [
      rasters[i]
      for i in sorted(np.random.default_rng(seed).choice(len(rasters), max_files, replace=False))
    ]
  return fit_stretch_arrays(((p, read_bands(p, spec)) for p in rasters), spec, seed)


def fit_stretch_arrays(named_bands, spec: RasterSpec, seed: int = 0) -> RasterSpec:
  """fit_stretch over (name, chosen bands [C, H, W] masked) pairs (files or TFDS examples)."""
  per_band = None
  rng = np.random.default_rng(seed)
  for p, data in named_bands:
    vals = [np.ma.compressed(b) for b in data]
    vals = [v if len(v) <= 4096 else rng.choice(v, 4096, replace=False) for v in vals]
    per_band = [[] for _ in vals] if per_band is None else per_band
    if len(vals) != len(per_band):
      raise errors.InvalidInput(f"{p}: gives {len(vals)} band(s), other rasters {len(per_band)}")
    for acc, v in zip(per_band, vals):
      acc.append(v)
  lo_q, hi_q = spec.stretch
  low = tuple(float(np.percentile(np.concatenate(a), lo_q)) for a in per_band)
  high = tuple(float(np.percentile(np.concatenate(a), hi_q)) for a in per_band)
  return dataclasses.replace(spec, low=low, high=high)


def center_lonlat(path: str) -> Tuple[float, float]:
  """WGS84 (lon, lat) of the raster's centre, or (nan, nan) without a transform and CRS."""
  with open_raster(path) as src:
    return _lonlat(src)


def _lonlat(src) -> Tuple[float, float]:
  from rasterio.transform import Affine  # pylint: disable=g-import-not-at-top

  if src.crs is None or src.transform == Affine.identity():
    return float("nan"), float("nan")
  x, y = src.xy(src.height / 2.0, src.width / 2.0, offset="ul")  # the centre point, in the CRS
  lon, lat = to_wgs84(src.crs.to_wkt()).transform(x, y)
  return float(lon), float(lat)


@functools.lru_cache(maxsize=64)
def to_wgs84(wkt: str):
  """One pyproj transformer per CRS of an archive (building one costs more than a header)."""
  from pyproj import CRS, Transformer  # pylint: disable=g-import-not-at-top

  return Transformer.from_crs(CRS.from_user_input(wkt), CRS.from_epsg(4326), always_xy=True)


def table_lonlat(paths: Sequence[str]) -> np.ndarray:
  """float64 [N, 2] (lon, lat) per path; NaN for non-rasters and rasters without coordinates."""
  out = np.full((len(paths), 2), np.nan)
  for i, p in enumerate(paths):
    if is_raster(p):
      out[i] = center_lonlat(p)
  return out
