"""An HTTP search service over a codes file: a JSON API and a web page.

  python -m rshash_jax.main serve --encoder=/tmp/dhcnn --codes=/tmp/ucm_codes.npz --port=8080
  # then open http://127.0.0.1:8080/ , or:
  curl -F image=@query.png 'http://127.0.0.1:8080/api/search?k=10'
  curl -H 'Content-Type: application/json' -d '{"path": "/data/ucm/beach/beach00.tif"}' \
      'http://127.0.0.1:8080/api/search?k=10'

The encoder and the index are loaded once. Built on Starlette, served by uvicorn: Starlette
is the small, well-kept ASGI toolkit FastAPI itself is built on; it has what this needs
(routing, multipart uploads, an in-process test client) and nothing we would not use.

API (every error is JSON {"error": message} with a 4xx status; the service keeps serving):
  GET  /api/info             encoder (method, backbone, bits, identity, classes), index size,
                             the archive's WGS84 bounds, whether it has window footprints,
                             each scene's outline (the hull of its windows; <= 2000 scenes)
                             and the basemap (serve --basemap)
  GET  /api/archive?offset=&limit=   archive entries [{id, path, label}] (limit <= 200)
  POST /api/search?k=N[&bbox=MINLON,MINLAT,MAXLON,MAXLAT]
                             query: multipart field `image` (an image file: PNG, JPEG, BMP,
                             GIF, WebP, TIFF), or JSON {"path": P} / {"id": I} naming an
                             archive image, or {"lon": X, "lat": Y}: the window of a scene
                             archive that holds that place. -> {"query": {...}, "hits":
                             [{"rank", "id", "path", "distance", "label", "relevant", "lon",
                             "lat"} (+ "scene", "window", "footprint" for windows)]} sorted
                             by (distance, id), as retrieval.hits formats them for `search`
                             too; "predicted" label(s) for DHCNN encoders. With bbox, only
                             the archive entries in the box are ranked (an exact scan of
                             them, found through a spatial index).
  GET  /api/images/{id}?size=S   an archive image or window as PNG (longer side <= S)
  GET  /                     the web page (static/index.html): upload or pick a query, or
                             click the map; the hits with their distances and, for a
                             georeferenced archive, on a map (Leaflet, vendored under
                             static/vendor/leaflet: footprints over the --basemap tiles, or
                             over a graticule without one); click a footprint for its chip.
  GET  /static/...           the page's files (no directory listing)
Status codes, decided by the error's type (rshash_jax.errors), never by its text: 400 bad
request (k, JSON, missing field), 403 a Host or Origin not allowed, 404 unknown id/path, 413
an upload over --max_upload_mb or an image whose header declares more than --max_image_mb
of pixels (TooLarge), 415 not a decodable image (NotAnImage), 422 an image this encoder
cannot take (16-bit, float, or many bands without a band choice), 503 the image memory
budget stayed busy, 500 a bug (logged with its traceback).

Hostile clients (see `serve`): every image's header is checked before it is decoded, and
concurrent decodes share a memory budget (image_limits.Budget); a request must arrive
whole (line, headers, body) within --request_timeout_s, idle connections close after 5 s,
one client address holds at most --max_connections_per_client connections (the server
holds 256), Host must be an allowed host (loopback by default, --allowed_hosts) and a
browser's Origin the service's own (or --allowed_origins), so a page on another site
cannot post to it; a client that disconnects is logged at debug level, not as an error.

Requests are encoded and ranked in batches: a worker thread takes every query waiting
(up to `max_batch`), runs the encoder once over them and ranks them together (one scan of
the codes for all), so concurrent clients share the work. Batch sizes are rounded up
to powers of two and k up to one of two buckets (64 and max_k) to bound the number of
compilations; every (batch size, k bucket) is compiled when the service starts, so no
client waits for a compilation.
"""

import concurrent.futures
import ctypes
import dataclasses
import io
import json
import logging
import os
import queue
import threading
from typing import Any, Dict, List, Optional

import numpy as np

from rshash_jax import errors
from rshash_jax.data import image_limits, input_pipeline, scenes
from rshash_jax.retrieval import (
  codes as codes_lib,
  encoder as encoder_lib,
  hamming,
  hits,
  multi_index,
)

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
_log = logging.getLogger("rshash_jax.serving")

# Host names a service bound to loopback answers to (--allowed_hosts adds others).
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
K_SMALL = 64  # the small k bucket; the other is max_k


def status_of(e: BaseException) -> int:
  """The HTTP status of an error in a request, by its type."""
  if isinstance(e, HTTPError):
    return e.status
  if isinstance(e, errors.TooLarge):
    return 413
  if isinstance(e, errors.NotAnImage):
    return 415
  if isinstance(e, errors.NotFound):
    return 404
  if isinstance(e, errors.Timeout):
    return 503
  if isinstance(e, errors.UserError):
    return 422
  return 500


def _release_memory():
  """Hands freed heap pages back to the OS after a large decode (glibc keeps them otherwise:
  RSS would stay at the peak of the largest image ever sent)."""
  try:
    ctypes.CDLL(None).malloc_trim(0)
  except (OSError, AttributeError):  # not glibc
    pass


class HTTPError(Exception):
  """An error answered as JSON {"error": message} with `status`."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status


@dataclasses.dataclass
class _Query:
  image: np.ndarray  # uint8 [S, S, 3], already resized
  k: int
  done: concurrent.futures.Future
  labels: Any = None  # the query's labels when it is an archive image
  rows: Optional[np.ndarray] = None  # a spatial filter's archive ids (None: all)


class SearchEngine:
  """The encoder, the codes file's metadata and an index (the scan, `hamming.HammingIndex`,
  or a multi-index of the same codes, `multi_index.MultiIndex`: the same hits), with a
  batching worker."""

  def __init__(
    self,
    encoder_path: str,
    codes_path: str,
    *,
    max_batch: int = 16,
    max_k: int = 1000,
    max_image_bytes: int = 64 << 20,
    image_budget_bytes: int = 1 << 30,
    index_path: Optional[str] = None,
    index_engine: str = "auto",
    basemap: str = "",
    basemap_attribution: str = "",
  ):
    for name, v, hi in (("max_batch", max_batch, 1024), ("max_k", max_k, 100_000)):
      if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= hi:
        raise errors.InvalidInput(f"serve: {name}={v!r} must be an integer in [1, {hi}]")
    if index_engine not in multi_index.ENGINES:
      raise errors.InvalidInput(
        f"serve: index_engine={index_engine!r} must be one of {multi_index.ENGINES}"
      )
    self.max_image_bytes = int(max_image_bytes)
    self.basemap, self.basemap_attribution = basemap, basemap_attribution
    self.image_budget = image_limits.Budget(image_budget_bytes)
    self.encoder = encoder_lib.load_encoder(encoder_path)
    db = codes_lib.load_codes(codes_path, self.encoder)
    self.codes_path = codes_path
    self.codes = db["codes"]
    self.archive = hits.Archive(db)
    self.num_codes = len(self.archive)
    if self.num_codes == 0:
      raise errors.InvalidInput(f"{codes_path}: the codes file is empty")
    self._search_kwargs = {}
    if index_path:
      self.index = multi_index.open_matching(index_path, db["codes"], codes_path)
      self._search_kwargs = {"engine": index_engine}
    else:
      self.index = hamming.HammingIndex(db["codes"], mesh=self.encoder.mesh)
    self.max_batch = max_batch
    self.max_k = min(max_k, self.num_codes)
    self.k_buckets = sorted({min(K_SMALL, self.max_k), self.max_k})
    self._queue: "queue.Queue[Optional[_Query]]" = queue.Queue()
    self._worker = threading.Thread(target=self._work, name="rshash-search", daemon=True)
    self._worker.start()
    # Compile every (batch size, k bucket) the worker can form now, not on a client's
    # first burst or first new k.
    pixels = np.zeros((self.encoder.image_size,) * 2 + (3,), np.uint8)
    for k in self.k_buckets:
      b = 1
      while b <= 1 << (self.max_batch - 1).bit_length():
        self._run([_Query(pixels, k, None)] * b)
        b *= 2

  # -- queries ------------------------------------------------------------------------
  def archive_id(self, *, path: Optional[str] = None, id_: Any = None) -> int:
    if path is not None and not isinstance(path, str):
      raise HTTPError(400, f"path must be a string, got {type(path).__name__}")
    if id_ is not None:
      if isinstance(id_, bool) or not isinstance(id_, int) or not 0 <= id_ < self.num_codes:
        raise HTTPError(404, f"no archive image with id {id_!r} (ids are 0..{self.num_codes - 1})")
      return id_
    i = self.archive.row(path)
    if i is None:
      raise HTTPError(
        404, f"not an image of the archive in {os.path.basename(self.codes_path)}: {path!r}"
      )
    return i

  def locate(self, lon: Any, lat: Any) -> int:
    """The archive window holding WGS84 (lon, lat) (hits.Archive.locate)."""
    for name, v in (("lon", lon), ("lat", lat)):
      if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
        raise HTTPError(400, f"{name} must be a number, got {v!r}")
    if not (-180 <= lon <= 180 and -90 <= lat <= 90):
      raise HTTPError(400, f"lon, lat = {lon}, {lat} is outside -180..180, -90..90")
    if self.archive.scenes is None:
      raise HTTPError(400, "this archive has no window footprints: query by image, path or id")
    i = self.archive.locate(float(lon), float(lat))
    if i is None:
      raise HTTPError(404, f"no window of the archive holds lon {lon}, lat {lat}")
    return i

  def region_rows(self, bbox: Optional[str]) -> Optional[np.ndarray]:
    """The archive ids in a `bbox` parameter (MINLON,MINLAT,MAXLON,MAXLAT), or None."""
    if bbox is None:
      return None
    import shapely  # pylint: disable=g-import-not-at-top

    try:
      v = [float(x) for x in bbox.split(",")]
    except ValueError:
      v = []
    if len(v) != 4 or not np.isfinite(v).all() or v[0] >= v[2] or v[1] >= v[3]:
      raise HTTPError(400, f"bbox={bbox[:100]!r}: expected MINLON,MINLAT,MAXLON,MAXLAT, min < max")
    rows = self.archive.region(shapely.box(*v))
    if not len(rows):
      raise HTTPError(404, f"no archive entry lies in bbox {bbox}")
    return rows

  def read_archive_image(self, i: int) -> np.ndarray:
    path = self.archive.paths[i]
    if scenes.is_tile(path):  # a window of a scene: read from its scene file
      path = scenes.parse_tile(path)[0]
    if not os.path.isfile(path):
      raise HTTPError(404, f"archive image {i} is not a readable file here: {path}")
    return input_pipeline.decode_file(self.archive.paths[i], self.encoder.raster).numpy()

  def decode_upload(self, data: bytes, name: str) -> np.ndarray:
    """An upload's pixels resized for the encoder: its header checked against
    max_image_bytes, then decoded and resized within the image memory budget (blocks while
    the budget is busy)."""
    with image_limits.held(self.image_budget):
      image = input_pipeline.decode_bytes(data, name, self.encoder.raster, self.max_image_bytes)
      return self._resize(image)

  def _resize(self, image: np.ndarray) -> np.ndarray:
    resized = input_pipeline.resize(
      image, self.encoder.image_size, None, int(self.encoder.meta.get("degrade", 1))
    ).numpy()
    if image.nbytes > 4 << 20:  # the decode's and the float resize's buffers are free now
      del image
      _release_memory()
    return resized

  def search_pixels(
    self,
    image: np.ndarray,
    k: int,
    query_labels=None,
    resized: bool = False,
    rows: Optional[np.ndarray] = None,
  ) -> Dict[str, Any]:
    """uint8 [H, W, 3] (already the encoder's size if `resized`) -> {"hits": [...],
    "predicted": label(s) or None} (retrieval.hits); blocks until done. query_labels (an
    archive query's) mark the hits relevant or not; `rows` (region_rows) ranks only those
    archive entries."""
    q = _Query(
      image if resized else self._resize(image),
      k,
      concurrent.futures.Future(),
      query_labels,
      rows,
    )
    self._queue.put(q)
    return q.done.result()

  def close(self):
    self._queue.put(None)
    self._worker.join(timeout=10)

  # -- the batching worker ------------------------------------------------------------
  def _work(self):
    while True:
      first = self._queue.get()
      if first is None:
        return
      batch = [first]
      while len(batch) < self.max_batch:
        try:
          nxt = self._queue.get_nowait()
        except queue.Empty:
          break
        if nxt is None:
          self._queue.put(None)
          break
        batch.append(nxt)
      try:
        results = self._run(batch)
      except Exception as e:  # pylint: disable=broad-except
        for q in batch:
          q.done.set_exception(e)
      else:
        for q, r in zip(batch, results):
          q.done.set_result(r)

  def _run(self, batch: List[_Query]) -> List[Dict[str, Any]]:
    n = len(batch)
    padded = 1 << (n - 1).bit_length()
    images = np.zeros((padded,) + batch[0].image.shape, np.uint8)
    images[:n] = np.stack([q.image for q in batch])
    res = self.encoder.encode(images)
    k_max = max(q.k for q in batch)
    k = next(b for b in self.k_buckets if b >= k_max)
    dist, idx = self.index.search(res["codes"][:n], k, **self._search_kwargs)
    out = []
    multilabel = bool(self.encoder.meta.get("multilabel"))
    for r, q in enumerate(batch):
      d, i = dist[r, : q.k], idx[r, : q.k]
      if q.rows is not None:  # a spatial filter: the exact scan of its entries
        kr = min(q.k, len(q.rows))
        d, i = (a[0] for a in hamming.subset_topk(res["codes"][r : r + 1], self.codes, q.rows, kr))
      out.append(
        {
          "hits": self.archive.hits(d, i, q.labels),
          "predicted": hits.predicted(self.encoder.class_names, multilabel, res, r),
        }
      )
    return out


def _png(image: np.ndarray, size: Optional[int]) -> bytes:
  from PIL import Image  # pylint: disable=g-import-not-at-top

  im = Image.fromarray(image)
  if size:
    im.thumbnail((size, size))
  buf = io.BytesIO()
  im.save(buf, format="PNG")
  return buf.getvalue()


class _BodyLimit:
  """ASGI middleware: a request body over `limit` bytes is answered 413 (by its declared
  Content-Length before anything is read, or while it streams in)."""

  def __init__(self, app, limit: int):
    self.app, self.limit = app, limit

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    headers = dict(scope.get("headers") or [])
    declared = headers.get(b"content-length")
    too_large = f"request body over the upload limit of {self.limit} bytes"
    if declared is not None and declared.isdigit() and int(declared) > self.limit:
      return await _send_json(send, 413, {"error": too_large})
    seen = 0

    async def limited_receive():
      nonlocal seen
      message = await receive()
      seen += len(message.get("body", b""))
      if seen > self.limit:
        raise HTTPError(413, too_large)
      return message

    return await self.app(scope, limited_receive, send)


async def _send_json(send, status: int, body: Dict[str, Any]):
  data = json.dumps(body).encode()
  await send(
    {
      "type": "http.response.start",
      "status": status,
      "headers": [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(data)).encode()),
      ],
    }
  )
  await send({"type": "http.response.body", "body": data})


class _OriginCheck:
  """ASGI middleware: a request carrying an Origin header (browsers send it with every
  cross-site POST) is refused 403 unless the origin is the service's own (its host:port as
  the Host header gives it) or one of `allowed`: a page on another site cannot make a
  local browser post to the service. Requests without Origin (curl, scripts) pass."""

  def __init__(self, app, allowed=()):
    self.app, self.allowed = app, {o.rstrip("/") for o in allowed}

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    headers = dict(scope.get("headers") or [])
    origin = headers.get(b"origin")
    if origin is not None:
      origin = origin.decode("latin-1").rstrip("/")
      host = headers.get(b"host", b"").decode("latin-1")
      own = origin.split("://", 1)[-1] == host and origin.startswith(("http://", "https://"))
      if not own and origin not in self.allowed and "*" not in self.allowed:
        return await _send_json(
          send, 403, {"error": f"origin {origin!r} may not use this service (--allowed_origins)"}
        )
    return await self.app(scope, receive, send)


def create_app(
  engine: SearchEngine,
  *,
  max_upload_bytes: int = 16 << 20,
  allowed_hosts=LOOPBACK_HOSTS,
  allowed_origins=(),
):
  """The Starlette application over `engine` (see the module docstring for the API)."""
  from starlette.applications import Starlette  # pylint: disable=g-import-not-at-top
  from starlette.middleware.trustedhost import TrustedHostMiddleware  # pylint: disable=g-import-not-at-top
  from starlette.requests import ClientDisconnect  # pylint: disable=g-import-not-at-top
  from starlette.concurrency import run_in_threadpool  # pylint: disable=g-import-not-at-top
  from starlette.exceptions import HTTPException  # pylint: disable=g-import-not-at-top
  from starlette.responses import FileResponse, JSONResponse, Response  # pylint: disable=g-import-not-at-top
  from starlette.routing import Mount, Route  # pylint: disable=g-import-not-at-top
  from starlette.staticfiles import StaticFiles  # pylint: disable=g-import-not-at-top

  def int_param(request, name, default, lo, hi):
    raw = request.query_params.get(name)
    if raw is None:
      return default
    try:
      v = int(raw)
    except ValueError:
      raise HTTPError(400, f"{name}={raw!r} is not an integer") from None
    if not lo <= v <= hi:
      raise HTTPError(400, f"{name}={v} is out of range [{lo}, {hi}]")
    return v

  async def page(request):
    del request
    return FileResponse(os.path.join(STATIC, "index.html"), media_type="text/html")

  scene_outlines = engine.archive.scene_outlines()  # computed once

  async def info(request):
    del request
    enc = engine.encoder
    return JSONResponse(
      {
        "method": enc.meta["method"],
        "backbone": enc.meta["backbone"],
        "bits": enc.bits,
        "identity": enc.identity,
        "image_size": enc.image_size,
        "classes": enc.class_names,
        "num_codes": engine.num_codes,
        "codes_file": os.path.basename(engine.codes_path),
        "has_coordinates": engine.archive.has_coordinates,
        "has_footprints": engine.archive.scenes is not None,
        "bounds": engine.archive.bounds(),
        "scene_outlines": scene_outlines,
        "basemap": engine.basemap,
        "basemap_attribution": engine.basemap_attribution,
        "max_upload_bytes": max_upload_bytes,
      }
    )

  async def archive(request):
    offset = int_param(request, "offset", 0, 0, max(engine.num_codes - 1, 0))
    limit = int_param(request, "limit", 24, 1, 200)
    return JSONResponse(
      {
        "entries": [
          engine.archive.entry(i) for i in range(offset, min(offset + limit, engine.num_codes))
        ],
        "num_codes": engine.num_codes,
      }
    )

  async def search(request):
    k = int_param(request, "k", 10, 1, engine.max_k)
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
      async with request.form(max_files=1, max_fields=4) as form:
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
          raise HTTPError(400, "multipart request without a file field `image`")
        data, name = await upload.read(), upload.filename or "upload"
      if not data:
        raise HTTPError(400, f"{name}: empty upload")
      image = await run_in_threadpool(engine.decode_upload, data, name)
      del data
      query, labels, resized = {"upload": name}, None, True
    elif ctype.startswith("application/json"):
      try:
        body = json.loads(await request.body())
      except (ValueError, RecursionError) as e:
        raise HTTPError(400, f"request body is not JSON, or nested too deeply: {e}") from None
      if not isinstance(body, dict) or not ({"path", "id", "lon"} & set(body)):
        raise HTTPError(
          400,
          'JSON body must be {"path": archive path}, {"id": archive id} or {"lon": ..., '
          '"lat": ...}',
        )
      if "lon" in body:
        i = engine.locate(body.get("lon"), body.get("lat"))
      else:
        i = engine.archive_id(path=body.get("path"), id_=body.get("id"))
      image = await run_in_threadpool(engine.read_archive_image, i)
      query = engine.archive.entry(i)
      labels, resized = engine.archive.labels[i], False
    else:
      raise HTTPError(
        400,
        "send the query as multipart/form-data (field `image`) or as JSON "
        '{"path": ...} / {"id": ...}',
      )
    rows = await run_in_threadpool(engine.region_rows, request.query_params.get("bbox"))
    result = await run_in_threadpool(engine.search_pixels, image, k, labels, resized, rows)
    return JSONResponse({"query": query, "k": k, **result})

  async def image(request):
    try:
      i = int(request.path_params["id"])
    except ValueError:
      raise HTTPError(404, f"no archive image with id {request.path_params['id']!r}") from None
    i = engine.archive_id(id_=i)
    size = int_param(request, "size", 0, 0, 4096)
    pixels = await run_in_threadpool(engine.read_archive_image, i)
    return Response(
      await run_in_threadpool(_png, pixels, size or None),
      media_type="image/png",
      headers={"Cache-Control": "max-age=3600"},
    )

  async def on_http_error(request, exc):  # HTTPError and the package's UserErrors
    del request
    return JSONResponse({"error": str(exc)}, status_code=status_of(exc))

  async def on_disconnect(request, exc):
    del exc
    _log.debug("%s %s: the client disconnected", request.method, request.url.path)
    return Response(status_code=400)  # nobody reads it

  async def on_starlette_error(request, exc):
    del request
    return JSONResponse({"error": exc.detail}, status_code=exc.status_code)

  async def on_bug(request, exc):
    _log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"error": f"internal error ({type(exc).__name__}): {exc}"}, status_code=500)

  app = Starlette(
    routes=[
      Route("/", page),
      Route("/api/info", info),
      Route("/api/archive", archive),
      Route("/api/search", search, methods=["POST"]),
      Route("/api/images/{id}", image),
      Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ],
    exception_handlers={
      HTTPError: on_http_error,
      errors.UserError: on_http_error,
      ClientDisconnect: on_disconnect,
      HTTPException: on_starlette_error,
      Exception: on_bug,
    },
  )
  guarded = _OriginCheck(_BodyLimit(app, max_upload_bytes), allowed_origins)
  return TrustedHostMiddleware(guarded, allowed_hosts=list(allowed_hosts))


def guarded_protocol(request_timeout_s: float = 30.0, max_per_client: int = 32):
  """uvicorn's h11 protocol with the two guards uvicorn lacks: a request (line, headers and
  body) must arrive whole within `request_timeout_s` of the connection opening or of the
  previous response, else the connection is closed (uvicorn times out only idle
  keep-alive connections after a response); and one client address holds at most
  `max_per_client` connections, so a slow client cannot take the server's whole
  connection limit from the others. Closes are logged at debug level."""
  import h11  # pylint: disable=g-import-not-at-top
  from uvicorn.protocols.http.h11_impl import H11Protocol  # pylint: disable=g-import-not-at-top

  class GuardedH11Protocol(H11Protocol):
    def connection_made(self, transport):
      super().connection_made(transport)
      self._deadline = None
      host = self.client[0] if self.client else None
      same = sum(1 for c in self.connections if c.client and c.client[0] == host)
      if host is not None and same > max_per_client:
        _log.debug("%s: over %d connections, closed", host, max_per_client)
        transport.close()
        return
      self._arm()

    def _arm(self):
      if self._deadline is None:
        self._deadline = self.loop.call_later(request_timeout_s, self._timed_out)

    def _disarm(self):
      if self._deadline is not None:
        self._deadline.cancel()
        self._deadline = None

    def _timed_out(self):
      self._deadline = None
      if self.conn.their_state not in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED):
        _log.debug("%s: request not complete after %g s, closed", self.client, request_timeout_s)
        self.transport.close()

    def data_received(self, data):
      super().data_received(data)
      if self.conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED):
        self._disarm()  # the request is in: the response's time is the app's
      else:
        self._arm()

    def on_response_complete(self):
      self._disarm()
      super().on_response_complete()  # uvicorn's keep-alive timer takes over

    def connection_lost(self, exc):
      self._disarm()
      super().connection_lost(exc)

  return GuardedH11Protocol


def serve(
  encoder_path: str,
  codes_path: str,
  *,
  host: str = "127.0.0.1",
  port: int = 8080,
  max_upload_mb: float = 16,
  max_batch: int = 16,
  max_k: int = 1000,
  max_image_mb: float = 64,
  image_budget_mb: float = 1024,
  request_timeout_s: float = 30,
  max_connections_per_client: int = 32,
  allowed_hosts=(),
  allowed_origins=(),
  index_path: Optional[str] = None,
  index_engine: str = "auto",
  basemap: str = "",
  basemap_attribution: str = "",
):
  """Loads the index once and serves until interrupted (limits: see the module docstring).
  `allowed_hosts` adds Host names to loopback's (and to `host` itself); "*" allows any."""
  import uvicorn  # pylint: disable=g-import-not-at-top

  engine = SearchEngine(
    encoder_path,
    codes_path,
    max_batch=max_batch,
    max_k=max_k,
    max_image_bytes=int(max_image_mb * (1 << 20)),
    image_budget_bytes=int(image_budget_mb * (1 << 20)),
    index_path=index_path,
    index_engine=index_engine,
    basemap=basemap,
    basemap_attribution=basemap_attribution,
  )
  hosts = list(LOOPBACK_HOSTS) + list(allowed_hosts)
  if host not in ("0.0.0.0", "::"):
    hosts.append(host)
  app = create_app(
    engine,
    max_upload_bytes=int(max_upload_mb * (1 << 20)),
    allowed_hosts=hosts,
    allowed_origins=allowed_origins,
  )
  print(
    f"serving {engine.num_codes} codes of {codes_path} with encoder {engine.encoder.identity} on "
    f"http://{host}:{port}/",
    flush=True,
  )
  try:
    uvicorn.run(
      app,
      host=host,
      port=port,
      log_level="warning",
      limit_concurrency=256,
      timeout_keep_alive=5,
      http=guarded_protocol(request_timeout_s, max_connections_per_client),
    )
  finally:
    engine.close()
