r"""rshash_jax command line: train, encode, search, index, export, serve.

  # train + evaluate (the default command; re-running resumes from WORKDIR's checkpoints)
  python -m rshash_jax.main --config=configs/dhcnn.py:local --workdir=/tmp/dhcnn
  python -m rshash_jax.main --config=configs/dhcnn.py --config.model.bits=32 --workdir=DIR
  python -m rshash_jax.main --config=configs/mrhash.py:local --workdir=/tmp/mrhash
  # encode an image folder (or tfds:NAME[:split]) with a trained model into a codes file
  python -m rshash_jax.main encode --encoder=/tmp/dhcnn --data=../shared/data/ucmerced \
      --out=/tmp/ucm_codes.npz
  # encode a scene archive (rasters of any size, any CRS) in windows of 256 px every 128 px
  python -m rshash_jax.main encode --encoder=/tmp/dhcnn --data=/data/scenes --tile=256 \
      --stride=128 [--gsd=10] --out=/tmp/scene_codes.npz
  # search: query images (files or folders) against a codes file; table + PNG grid
  python -m rshash_jax.main search --encoder=/tmp/dhcnn --codes=/tmp/ucm_codes.npz --k=8 \
      --png=/tmp/hits.png [--geojson=/tmp/hits.geojson] QUERY.tif [MORE ...]
  # search a scene archive from a place (the window holding lon, lat), in a bounding box,
  # and write the hits' footprints as GeoJSON polygons
  python -m rshash_jax.main search --encoder=/tmp/dhcnn --codes=/tmp/scene_codes.npz \
      --point=2.35,48.85 --bbox=-5,42,8,51 --geojson=/tmp/hits.geojson
  # index: a multi-index of a codes file (exact, sublinear); search --index then uses it
  python -m rshash_jax.main index --codes=/tmp/ucm_codes.npz --out=/tmp/ucm_index
  python -m rshash_jax.main search --encoder=/tmp/dhcnn --codes=/tmp/ucm_codes.npz \
      --index=/tmp/ucm_index QUERY.tif
  # export: an inference-only encoder (orbax) that rshash_jax.load_encoder(path) restores,
  # or a TensorFlow SavedModel (images or image files in, packed codes out; no JAX needed)
  python -m rshash_jax.main export --workdir=/tmp/dhcnn --out=/tmp/dhcnn_encoder
  python -m rshash_jax.main export --workdir=/tmp/dhcnn --out=/tmp/dhcnn_sm --format=saved_model
  # serve: a search service (JSON API + web page) over a codes file, on 127.0.0.1:8080
  python -m rshash_jax.main serve --encoder=/tmp/dhcnn --codes=/tmp/ucm_codes.npz --port=8080

--config takes an ml_collections config file, optionally `file.py:PRESETS` (see the
file's docstring); `--config.FIELD=VALUE` overrides any field. Training writes
WORKDIR/results.json, pr_curve.png, precision_at_k.png, TensorBoard logs, checkpoints/
and the trained encoder in WORKDIR/encoder. --encoder accepts an export or a workdir.

Errors in what you gave (a config value, a path, a corrupt image, codes of another encoder,
an existing output, an unreachable coordinator) print one line, `rshash: error: ...`, and
exit with status 2; --traceback (or RSHASH_TRACEBACK=1) shows where they were raised. Any
other error is a bug: it prints its traceback and exits with status 1.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from rshash_jax import errors  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  "config", None, "train: config file (file.py or file.py:presets).", lock_config=True
)
flags.DEFINE_string(
  "workdir", None, "train/export: directory of checkpoints, logs, results, encoder."
)
flags.DEFINE_string(
  "encoder", None, "encode/search/serve: an exported encoder or a training workdir."
)
flags.DEFINE_string(
  "data", None, "encode: class-folder root, any image folder, or tfds:NAME[:split]."
)
flags.DEFINE_string(
  "tile",
  None,
  "encode: --data is a scene archive (a raster, a folder of rasters, or a text file listing "
  "them) cut into windows of this size: output pixels (256) or metres on the ground (2560m).",
)
flags.DEFINE_string(
  "stride", None, "encode --tile: step between windows, in the unit of --tile (default: --tile)."
)
flags.DEFINE_string(
  "gsd",
  None,
  "encode --tile: every window resampled to this ground sampling distance (metres per "
  "pixel), whatever each scene's resolution; default: each scene's own.",
)
flags.DEFINE_string(
  "labels", None, "encode: a multi-label CSV (path,label1;label2) for the images under --data."
)
flags.DEFINE_string(
  "out",
  None,
  "encode: codes file (.npz) to write; export: encoder directory to create; index: the "
  "multi-index directory to create.",
)
flags.DEFINE_string("codes", None, "search/serve/index: codes file written by encode.")
flags.DEFINE_string(
  "index",
  None,
  "search/serve: a multi-index written by `index` from the same --codes file; ranks "
  "without a linear scan (the same hits in the same order).",
)
flags.DEFINE_enum(
  "index_engine",
  "auto",
  ["auto", "multi_index", "scan"],
  "search/serve with --index: auto (the engine `index` measured faster at the nearest k), "
  "multi_index or scan; every engine gives the same hits in the same order.",
)
flags.DEFINE_bool(
  "calibrate",
  True,
  "index: time the multi-index against the scan on 256 of the archive's own codes at k = 10 "
  "and 100 and store the faster per k in the index (what --index_engine=auto follows).",
)
flags.DEFINE_integer(
  "substrings", None, "index: substrings (hash tables); default bits / log2(codes), rounded up."
)
flags.DEFINE_string("host", "127.0.0.1", "serve: address to listen on (0.0.0.0: every interface).")
flags.DEFINE_integer("port", 8080, "serve: TCP port.")
flags.DEFINE_float("max_upload_mb", 16, "serve: largest accepted request body (MiB).")
flags.DEFINE_float(
  "max_image_mb",
  64,
  "serve: largest decoded upload (MiB, width x height x bands x bytes, "
  "from the header before decoding; 413 above).",
)
flags.DEFINE_float(
  "image_budget_mb",
  1024,
  "serve: memory all concurrent decodes and resizes may hold together "
  "(MiB; each reserves 6x its decoded size).",
)
flags.DEFINE_integer("max_k", 1000, "serve: largest k a client may ask for.")
flags.DEFINE_string(
  "basemap",
  "",
  "serve: an XYZ tile URL the page's map draws under the footprints, e.g. "
  "https://tile.openstreetmap.org/{z}/{x}/{y}.png (the browser fetches it); default none: "
  "a graticule.",
)
flags.DEFINE_string(
  "basemap_attribution", "", "serve --basemap: the attribution its provider requires."
)
flags.DEFINE_float(
  "request_timeout_s", 30, "serve: a request (line, headers, body) must arrive within this."
)
flags.DEFINE_integer(
  "max_connections_per_client", 32, "serve: open connections one client address may hold."
)
flags.DEFINE_list(
  "allowed_hosts", [], "serve: Host names answered besides loopback and --host ('*': any)."
)
flags.DEFINE_list(
  "allowed_origins",
  [],
  "serve: browser origins (scheme://host:port) allowed besides the service's own ('*': any).",
)
flags.DEFINE_integer("k", 10, "search: results per query.")
flags.DEFINE_multi_string(
  "point",
  [],
  "search: LON,LAT (WGS84): query with the window of the scene archive that holds this point "
  "(repeatable).",
)
flags.DEFINE_multi_integer(
  "query_id", [], "search: query with the archive entry of this id (its stored code; repeatable)."
)
flags.DEFINE_list(
  "bbox", [], "search: MINLON,MINLAT,MAXLON,MAXLAT: rank only the archive entries in this box."
)
flags.DEFINE_string(
  "within",
  None,
  "search: a GeoJSON file: rank only the archive entries its geometry intersects "
  "(with --bbox: both).",
)
flags.DEFINE_string("png", None, "search: write a retrieval grid PNG here.")
flags.DEFINE_string(
  "geojson",
  None,
  "search: write the queries and hits (WGS84 points, distances) as a GeoJSON "
  "FeatureCollection here.",
)
flags.DEFINE_integer("batch_size", 64, "encode: images per batch (over all devices).")
flags.DEFINE_integer("chunk", 4096, "encode: images per resumable chunk.")
flags.DEFINE_enum(
  "format",
  "encoder",
  ["encoder", "saved_model"],
  "export: `encoder` (orbax, for rshash_jax.load_encoder) or `saved_model` (TensorFlow "
  "SavedModel with preprocessing; see rshash_jax/serving/saved_model.py).",
)
flags.DEFINE_bool(
  "traceback",
  False,
  "show the full traceback of errors in the input too (default from RSHASH_TRACEBACK=1).",
)

COMMANDS = ("train", "encode", "search", "index", "export", "serve")


class _QuietOrbax:
  """Drops orbax's per-save INFO chatter (dozens of lines per checkpoint); keeps warnings."""

  def filter(self, record):
    return record.levelno >= 30 or "orbax" not in record.pathname


def _say(text: str):
  """Prints on the primary process only (every process runs the same command)."""
  import jax  # pylint: disable=g-import-not-at-top

  if jax.process_index() == 0:
    print(text)


def _require(command, *names):
  missing = [n for n in names if getattr(FLAGS, n) is None]
  if missing:
    raise app.UsageError(f"{command} needs --{', --'.join(missing)} (see --help)")


def _train():
  _require("train", "config", "workdir")
  import jax  # pylint: disable=g-import-not-at-top
  from rshash_jax.training import evaluation  # pylint: disable=g-import-not-at-top

  logging.info(
    "JAX devices: %d (%s), processes: %d",
    jax.device_count(),
    jax.devices()[0].platform,
    jax.process_count(),
  )
  config = FLAGS.config
  if config.method == "dhcnn":
    from rshash_jax.training import train_dhcnn  # pylint: disable=g-import-not-at-top

    results = train_dhcnn.train_and_evaluate(config, FLAGS.workdir)
  elif config.method == "mrhash":
    from rshash_jax.training import train_mrhash  # pylint: disable=g-import-not-at-top

    results = train_mrhash.train_and_evaluate(config, FLAGS.workdir)
  else:
    raise errors.InvalidInput(
      f"config.method={config.method!r} is not a known method (dhcnn, mrhash)"
    )
  if results:
    _say(evaluation.summary_line(results))
    _say(f"results: {os.path.join(FLAGS.workdir, 'results.json')}")


def _traceback_env() -> bool:
  return os.environ.get("RSHASH_TRACEBACK", "") not in ("", "0")


def _show_traceback() -> bool:
  return FLAGS.traceback or _traceback_env()


def is_input_error(e: BaseException) -> bool:
  """Errors in what the user gave (one line, exit 2) as opposed to bugs (traceback, exit 1):
  rshash_jax's own input checks, usage errors, and OS errors on a named path."""
  return (
    isinstance(e, (errors.UserError, app.UsageError, flags.Error))
    or (isinstance(e, OSError) and getattr(e, "filename", None) is not None)
    or errors.storage_error(e) is not None
  )


def error_line(e: BaseException) -> str:
  """`rshash: error: <message>` on one line."""
  msg = str(errors.storage_error(e) or e)
  if "Traceback (most recent call last):" in msg:  # a config file's own error, inside absl's
    head = msg.split("Traceback (most recent call last):")[0]
    last = msg.strip().splitlines()[-1]
    msg = (
      head + last.split(": ", 1)[-1]
      if last.split(":")[0].endswith(("Error", "InvalidInput"))
      else head + last
    )
  msg = " ".join(msg.split()) or type(e).__name__
  return f"rshash: error: {msg}"


def main(argv):
  logging.get_absl_handler().addFilter(_QuietOrbax())
  multi = False
  try:
    args = argv[1:]
    command = args.pop(0) if args and args[0] in COMMANDS else "train"
    if command == "serve":
      # TensorFlow only decodes and resizes here; its oneDNN kernels keep per-thread buffers
      # that hold RSS at the peak of the largest uploads (benchmarks/serve.py --hostile:
      # 8 concurrent 3000^2 PNGs 1.97 GB -> 1.84 GB after, 1.12 -> 0.75 GB without). The
      # pixels are identical either way (checked on UC Merced and a 3000 x 2000 image).
      os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    if command != "search" and args:
      raise app.UsageError(f"unexpected arguments: {' '.join(args)}")
    from rshash_jax.parallel import distributed  # pylint: disable=g-import-not-at-top

    # Before anything touches a JAX backend: join the other processes, if any (see
    # rshash_jax/parallel/distributed.py for the environment variables).
    multi = distributed.initialize_from_env()
    _command(command, args)
  except Exception as e:  # pylint: disable=broad-except
    expected = is_input_error(e)
    if multi:
      distributed.fail_fast(
        e, code=errors.EXIT_CODE if expected else 1, brief=expected and not _show_traceback()
      )
    if not expected:
      raise
    _exit_with(e, _show_traceback())


def _exit_with(e: BaseException, show_traceback: bool):
  """An error in the input: its one line (after its traceback if asked for), exit 2."""
  if show_traceback:
    import traceback  # pylint: disable=g-import-not-at-top

    traceback.print_exception(e, file=sys.stderr)
  print(error_line(e), file=sys.stderr, flush=True)
  sys.exit(errors.EXIT_CODE)


def _command(command, args):
  from rshash_jax import commands  # pylint: disable=g-import-not-at-top
  from rshash_jax.data import input_pipeline, scenes  # pylint: disable=g-import-not-at-top

  input_pipeline.configure_tf()
  if command == "train":
    _train()
  elif command == "encode":
    _require("encode", "encoder", "data", "out")
    if (FLAGS.stride or FLAGS.gsd) and not FLAGS.tile:
      raise app.UsageError("--stride and --gsd apply with --tile (a scene archive)")
    codes = commands.encode(
      FLAGS.encoder,
      FLAGS.data,
      FLAGS.out,
      batch_size=FLAGS.batch_size,
      chunk=FLAGS.chunk,
      labels_file=FLAGS.labels,
      grid=scenes.Grid.parse(FLAGS.tile, FLAGS.stride or "", FLAGS.gsd or "")
      if FLAGS.tile
      else None,
    )
    _say(f"codes: {codes}")
  elif command == "search":
    _require("search", "encoder", "codes")
    if not (args or FLAGS.point or FLAGS.query_id):
      raise app.UsageError(
        "search needs query images or folders after the flags, --point or --query_id"
      )
    commands.search(
      FLAGS.encoder,
      FLAGS.codes,
      args,
      k=FLAGS.k,
      png=FLAGS.png,
      geojson=FLAGS.geojson,
      index_path=FLAGS.index,
      index_engine=FLAGS.index_engine,
      points=[_lonlat(p) for p in FLAGS.point],
      query_ids=FLAGS.query_id,
      region=commands.parse_region(FLAGS.bbox, FLAGS.within),
    )
    if FLAGS.png:
      _say(f"\ngrid: {FLAGS.png}")
    if FLAGS.geojson:
      _say(f"GeoJSON: {FLAGS.geojson}")
  elif command == "index":
    _require("index", "codes", "out")
    out = commands.build_index(
      FLAGS.codes, FLAGS.out, substrings=FLAGS.substrings, calibrate=FLAGS.calibrate
    )
    _say(f"index: {out}")
  elif command == "serve":
    _require("serve", "encoder", "codes")
    import jax  # pylint: disable=g-import-not-at-top

    if jax.process_count() > 1:
      raise app.UsageError(
        "serve runs in one process (it holds the whole index); start it without "
        "JAX_COORDINATOR_ADDRESS / RSHASH_DISTRIBUTED"
      )
    from rshash_jax.serving import service  # pylint: disable=g-import-not-at-top

    service.serve(
      FLAGS.encoder,
      FLAGS.codes,
      host=FLAGS.host,
      port=FLAGS.port,
      max_upload_mb=FLAGS.max_upload_mb,
      max_k=FLAGS.max_k,
      max_image_mb=FLAGS.max_image_mb,
      image_budget_mb=FLAGS.image_budget_mb,
      request_timeout_s=FLAGS.request_timeout_s,
      max_connections_per_client=FLAGS.max_connections_per_client,
      allowed_hosts=FLAGS.allowed_hosts,
      allowed_origins=FLAGS.allowed_origins,
      index_path=FLAGS.index,
      index_engine=FLAGS.index_engine,
      basemap=FLAGS.basemap,
      basemap_attribution=FLAGS.basemap_attribution,
    )
  else:
    _require("export", "workdir", "out")
    if FLAGS.format == "saved_model":
      from rshash_jax.serving import saved_model  # pylint: disable=g-import-not-at-top

      _say(f"SavedModel: {saved_model.export_saved_model(FLAGS.workdir, FLAGS.out)}")
    else:
      _say(f"encoder: {commands.export(FLAGS.workdir, FLAGS.out)}")


def _lonlat(text: str):
  """--point's LON,LAT."""
  try:
    lon, lat = (float(v) for v in text.split(","))
  except ValueError:
    raise errors.InvalidInput(f"--point={text!r} is invalid: LON,LAT in degrees (WGS84)") from None
  if not (-180 <= lon <= 180 and -90 <= lat <= 90):
    raise errors.InvalidInput(f"--point={text!r} is outside -180..180, -90..90")
  return lon, lat


def _parse_flags(argv):
  """absl's parsing, with a bad flag or --config value reported as one line, exit 2."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    _exit_with(e, _traceback_env() or "--traceback" in argv)  # FLAGS.traceback is not parsed yet


def run():
  """Console-script entry point (`rshash`)."""
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  sys.exit(run())
