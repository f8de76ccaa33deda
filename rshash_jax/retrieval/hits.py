"""What a hit shows: one formatter for `search`, the service's JSON and GeoJSON.

A hit is {"rank", "id", "path", "distance", "label", "relevant", "lon", "lat"}, plus
"scene", "window" and "footprint" for the windows of a scene archive:
  label     every label of the archive image, ";"-joined (a class name, or the labels of a
            multi-hot row); None where the codes file has none.
  relevant  whether it shares the query's class (class ids) or at least one of its labels
            (multi-hot rows); None where the query's labels are unknown.
  lon, lat  WGS84 centre of a georeferenced raster or window, else None.
  scene, window, footprint   a window's scene file, [col, row, width, height] in scene
            pixels, and its corners [[lon, lat] x 4] in WGS84 (None without a CRS).
A query's predicted labels follow one rule: a multi-label encoder predicts every label
whose logit is > 0 (";"-joined, "-" for none), a single-label one the argmax class.
"""

import json
import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from rshash_jax.data import scenes


class Archive:
  """The per-image metadata of a codes file (retrieval.codes.load_codes's arrays)."""

  def __init__(self, db: Dict[str, np.ndarray]):
    self.paths = [str(p) for p in db["paths"]]
    self.labels = np.asarray(db["labels"])
    self.class_names = [str(c) for c in db["class_names"]]
    n = len(self.paths)
    self.lon = np.asarray(db["lon"], np.float64) if "lon" in db else np.full(n, np.nan)
    self.lat = np.asarray(db["lat"], np.float64) if "lat" in db else np.full(n, np.nan)
    self.has_coordinates = bool(np.isfinite(self.lon).any())
    self._tree = None  # the spatial index of `region`, built on first use
    self.scenes = [str(p) for p in db["scenes"]] if "scenes" in db else None
    if self.scenes is not None:
      self.scene = np.asarray(db["scene"])
      self.window = np.asarray(db["window"])
      self.footprint = np.asarray(db["footprint"], np.float64)
    self._rows = {p: i for i, p in enumerate(self.paths)}

  def __len__(self) -> int:
    return len(self.paths)

  def label_names(self, labels) -> List[str]:
    """The names of a label value: a class id (-1 or out of range: none) or a multi-hot row."""
    if np.ndim(labels) == 1:
      return [n for n, v in zip(self.class_names, labels) if v]
    lab = int(labels)
    return [self.class_names[lab]] if 0 <= lab < len(self.class_names) else []

  def row(self, path) -> Optional[int]:
    """The row of archive image `path` (as written, else as an absolute path), or None."""
    i = self._rows.get(path)
    return (
      i if i is not None or not isinstance(path, str) else self._rows.get(os.path.abspath(path))
    )

  def label(self, i: int) -> Optional[str]:
    return ";".join(self.label_names(self.labels[i])) or None

  def query_labels(self, path: str, row: Optional[int] = None):
    """A query's labels: its row of the archive if it is one, else its class folder's class
    (class-id archives), else unknown (-1)."""
    if row is not None:
      return self.labels[row]
    q_class = os.path.basename(os.path.dirname(path))
    known = q_class in self.class_names and self.labels.ndim == 1
    return np.int64(self.class_names.index(q_class) if known else -1)

  def relevant(self, i: int, query_labels) -> Optional[bool]:
    lab = self.labels[i]
    if np.ndim(lab) == 1:  # multi-hot
      return None if np.ndim(query_labels) != 1 else bool(np.any((lab > 0) & (query_labels > 0)))
    if np.ndim(query_labels) != 0 or int(query_labels) < 0 or int(lab) < 0:
      return None
    return int(lab) == int(query_labels)

  def lonlat(self, i: int):
    ok = np.isfinite(self.lon[i]) and np.isfinite(self.lat[i])
    return (float(self.lon[i]), float(self.lat[i])) if ok else (None, None)

  def entry(self, i: int) -> Dict[str, Any]:
    """{"id", "path", "label", "lon", "lat"} of archive image i (and "scene", "window",
    "footprint" of a scene archive's window)."""
    lon, lat = self.lonlat(i)
    out = {"id": int(i), "path": self.paths[i], "label": self.label(i), "lon": lon, "lat": lat}
    if self.scenes is not None:
      fp = self.footprint[i]
      out["scene"] = self.scenes[int(self.scene[i])]
      out["window"] = [int(v) for v in self.window[i]]
      out["footprint"] = fp.tolist() if np.isfinite(fp).all() else None
    return out

  def bounds(self) -> Optional[List[float]]:
    """[min lon, min lat, max lon, max lat] of the archive's coordinates (footprints
    included), or None without any."""
    lon, lat = self.lon, self.lat
    if self.scenes is not None:
      lon = np.concatenate([lon, self.footprint[..., 0].ravel()])
      lat = np.concatenate([lat, self.footprint[..., 1].ravel()])
    ok = np.isfinite(lon) & np.isfinite(lat)
    if not ok.any():
      return None
    return [float(lon[ok].min()), float(lat[ok].min()), float(lon[ok].max()), float(lat[ok].max())]

  def scene_outlines(self, limit: int = 2000) -> List[Dict[str, Any]]:
    """[{"name", "outline": [[lon, lat], ...]}]: each scene's coverage, the convex hull of
    its windows' footprints in WGS84 (at most `limit` scenes; none without footprints)."""
    import shapely  # pylint: disable=g-import-not-at-top

    if self.scenes is None:
      return []
    out = []
    for s, name in enumerate(self.scenes[:limit]):
      fp = self.footprint[self.scene == s].reshape(-1, 2)
      fp = fp[np.isfinite(fp).all(axis=1)]
      if len(fp):
        hull = shapely.convex_hull(shapely.multipoints(fp))
        ring = hull.exterior.coords if hull.geom_type == "Polygon" else hull.coords
        out.append({"name": os.path.basename(name), "outline": [list(c) for c in ring]})
    return out

  def locate(self, lon: float, lat: float) -> Optional[int]:
    """The window of a scene archive that holds WGS84 (lon, lat) (where windows overlap,
    the one whose centre is nearest), or None (and None for archives of images: an
    image's extent is not stored)."""
    import shapely  # pylint: disable=g-import-not-at-top

    if self.scenes is None or not (np.isfinite(lon) and np.isfinite(lat)):
      return None
    rows = self.region(shapely.Point(lon, lat))
    rows = rows[np.isfinite(self.footprint[rows]).all(axis=(1, 2))]
    if not len(rows):
      return None
    centre = self.footprint[rows].mean(axis=1)  # where windows overlap: the nearest centre
    return int(rows[np.argmin((centre[:, 0] - lon) ** 2 + (centre[:, 1] - lat) ** 2)])

  def region(self, geometry) -> np.ndarray:
    """The sorted ids of the archive entries a WGS84 shapely geometry intersects (a
    window's footprint, else an image's centre); entries without coordinates are outside.
    A spatial index (shapely's STRtree) is built on the first call: later calls touch
    only the entries near the geometry."""
    if self._tree is None:
      self._tree = scenes.spatial_index(
        self.footprint if self.scenes is not None else None, self.lon, self.lat
      )
    tree, ids = self._tree
    return np.unique(ids[tree.query(geometry, predicate="intersects")])

  def hits(self, dist: np.ndarray, idx: np.ndarray, query_labels=None) -> List[Dict[str, Any]]:
    """One query's ranked hits from its row of distances and archive indices."""
    out = []
    for r, (d, j) in enumerate(zip(np.asarray(dist), np.asarray(idx))):
      j = int(j)
      rel = None if query_labels is None else self.relevant(j, query_labels)
      out.append({"rank": r + 1, **self.entry(j), "distance": int(d), "relevant": rel})
    return out


def predicted(
  class_names: Sequence[str], multilabel: bool, result: Dict[str, np.ndarray], row: int
) -> Optional[str]:
  """Row `row`'s predicted label(s) of an Encoder.encode result; None without a classifier."""
  if "predicted" not in result or not class_names:
    return None
  if multilabel:
    return ";".join(n for n, z in zip(class_names, result["logits"][row]) if z > 0) or "-"
  return class_names[int(result["predicted"][row])]


def geometry(item: Dict[str, Any]) -> Optional[Dict[str, Any]]:
  """A hit's or query's GeoJSON geometry: a window's footprint as a Polygon (WGS84, the
  ring closed), else its centre as a Point, else None (nothing is invented)."""
  fp = item.get("footprint")
  if fp is not None:
    return {"type": "Polygon", "coordinates": [[list(map(float, c)) for c in fp + fp[:1]]]}
  if item.get("lon") is not None and item.get("lat") is not None:
    return {"type": "Point", "coordinates": [item["lon"], item["lat"]]}
  return None


_WINDOW_KEYS = ("scene", "window")


def write_geojson(results: List[Dict], path: str):
  """Queries and their hits (as `search` returns them) as one GeoJSON FeatureCollection:
  windows of a scene archive as footprint polygons (with their scene and window), other
  georeferenced images as points; a feature without coordinates has geometry null."""

  def feature(item, props):
    props.update({k: item[k] for k in _WINDOW_KEYS if item.get(k) is not None})
    return {"type": "Feature", "geometry": geometry(item), "properties": props}

  feats = []
  for qi, r in enumerate(results):
    feats.append(
      feature(r, {"role": "query", "query": qi, "path": r["query"], "predicted": r["predicted"]})
    )
    for h in r["results"]:
      feats.append(
        feature(
          h,
          {
            "role": "hit",
            "query": qi,
            "rank": h["rank"],
            "distance": h["distance"],
            "path": h["path"],
            "label": h["label"],
            "relevant": h["relevant"],
          },
        )
      )
  with open(path, "w") as f:
    json.dump({"type": "FeatureCollection", "features": feats}, f, indent=1)
