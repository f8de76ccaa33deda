"""Rerun the docs' quality rows on UC Merced and check each against its record.

    python benchmarks/reproduce.py --record          # run every short row, write its record
    python benchmarks/reproduce.py --check           # rerun the short rows, compare to records
    python benchmarks/reproduce.py --check --all     # every row, the long ones too (~50 min)
    python benchmarks/reproduce.py --check --rows=dhcnn_local,mrhash_local

Each row is a command a user runs (`python -m rshash_jax.main --config=...`), in a child
process with the machine's default devices, on ../shared/data/ucmerced (where the `local`
presets find it), seed 0, the presets' test split; all rows share one feature cache under
--workdir. A row's record is benchmarks/results/quality/ROW.json (benchmarks/_record.py:
command, commit, date, host, versions) with the fields of results.json the docs show and
the wall time. docs/results.md renders its tables from these records
(benchmarks/render.py); a row without a record shows no figures there.

--check compares every quality field with the record: within TOLERANCE (0.005, absolute)
for mAP, accuracy and recall figures, within 2% for distinct-code counts. The runs are
seeded and deterministic on one host, so on the recording host they match exactly; the
tolerance is for another CPU's float summation order. Wall times are recorded, not
compared (they belong to the host). Exit status 1 when a field is off or a row fails.

The other recorded benchmarks (Hamming, features, train step, selection grids, service)
are rerun by their own commands, which their records name; `benchmarks/render.py` lists
every record that feeds the docs.
"""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUALITY = os.path.join(REPO, "benchmarks", "results", "quality")
DATA = "../shared/data/ucmerced"
TOLERANCE = 0.005
COUNT_TOLERANCE = 0.02


@dataclasses.dataclass(frozen=True)
class Row:
  name: str
  args: tuple  # rshash_jax.main arguments
  long: bool = False  # minutes, not seconds: only with --all or --rows


ROWS = (
  Row("dhcnn_local", ("--config=configs/dhcnn.py:local",)),
  Row("dhcnn_local_bits16", ("--config=configs/dhcnn.py:local,bits=16",)),
  Row("dhcnn_local_bits32", ("--config=configs/dhcnn.py:local,bits=32",)),
  Row("dhcnn_local_bits48", ("--config=configs/dhcnn.py:local,bits=48",)),
  Row(
    "dhcnn_official",
    ("--config=configs/dhcnn.py", f"--config.data.source=folder:{DATA}"),
  ),
  Row(
    "dhcnn_local_unseen25",
    ("--config=configs/dhcnn.py:local", "--config.data.unseen_classes=0.25"),
  ),
  Row("dhcnn_neighbours", ("--config=configs/dhcnn.py:neighbours",)),
  Row(
    "dhcnn_neighbours_unseen25",
    ("--config=configs/dhcnn.py:neighbours", "--config.data.unseen_classes=0.25"),
  ),
  Row("mrhash_local", ("--config=configs/mrhash.py:local",)),
  Row("mrhash_local_itq", ("--config=configs/mrhash.py:local,itq",)),
  Row("dhcnn_best", ("--config=configs/dhcnn.py:best",), long=True),
  Row("dhcnn_classes", ("--config=configs/dhcnn.py:classes",), long=True),
  Row(
    "dhcnn_classes_unseen25",
    ("--config=configs/dhcnn.py:classes", "--config.data.unseen_classes=0.25"),
    long=True,
  ),
  Row(
    "dhcnn_best_unseen25",
    ("--config=configs/dhcnn.py:best", "--config.data.unseen_classes=0.25"),
    long=True,
  ),
)
BY_NAME = {r.name: r for r in ROWS}

# results.json fields the docs show; the nested ones flattened.
FIELDS = (
  "map",
  "map_tie_aware",
  "accuracy",
  "map_at_r",
  "map_at_100",
  "neighbour_recall_at10",
  "neighbour_recall_at100",
  "itq_neighbour_recall_at10",
  "distinct_codes",
  "num_database",
  "unseen_map",
  "unseen_map_tie_aware",
  "unseen_map_itq",
  "unseen_map_float",
)
COUNTS = ("distinct_codes", "num_database")


def extract(res: dict) -> dict:
  flat = dict(res)
  flat["map_at_100"] = (res.get("map_at") or {}).get("100")
  nr = res.get("neighbour_recall_at") or {}
  flat["neighbour_recall_at10"], flat["neighbour_recall_at100"] = nr.get("10"), nr.get("100")
  itq = (res.get("reference_itq") or {}).get("neighbour_recall_at") or {}
  flat["itq_neighbour_recall_at10"] = itq.get("10")
  return {k: flat[k] for k in FIELDS if flat.get(k) is not None}


def shown(row: Row) -> str:
  """The command as the docs show it (no workdir or cache: those are the runner's)."""
  return " ".join(["python -m rshash_jax.main", *row.args])


def run(row: Row, workdir: str) -> dict:
  wd = os.path.join(workdir, row.name)
  if os.path.exists(wd):
    raise SystemExit(f"{wd} exists: reproduce.py runs every row fresh (remove it, or --workdir)")
  cmd = [sys.executable, "-m", "rshash_jax.main", *row.args] + [
    f"--workdir={wd}",
    f"--config.features.cache_dir={os.path.join(workdir, 'cache')}",
  ]
  t = time.perf_counter()
  p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3 * 3600)
  wall = time.perf_counter() - t
  if p.returncode:
    raise RuntimeError(f"{row.name} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
  with open(os.path.join(wd, "results.json")) as f:
    res = json.load(f)
  out = extract(res)
  out["wall_s"] = wall
  out["timing"] = res.get("timing")
  out["devices"] = res.get("devices")
  return out


def record_path(name: str) -> str:
  return os.path.join(QUALITY, f"{name}.json")


def load_record(name: str) -> dict | None:
  path = record_path(name)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def compare(name: str, new: dict, old: dict) -> list:
  """The fields of `new` outside their tolerance of the record `old`."""
  bad = []
  for k in FIELDS:
    if k not in old:
      continue
    if k not in new:
      bad.append(f"{name}.{k}: recorded {old[k]}, missing now")
      continue
    tol = COUNT_TOLERANCE * abs(old[k]) if k in COUNTS else TOLERANCE
    if abs(new[k] - old[k]) > tol:
      bad.append(f"{name}.{k}: {new[k]:.4f} against the record's {old[k]:.4f} (+- {tol:g})")
  return bad


# ---- the docs' tables (benchmarks/render.py) ----


def _cell(rec, key, fmt="{:.4f}"):
  v = rec["results"].get(key) if rec else None
  return fmt.format(v) if v is not None else ""


def _wall(rec):
  if not rec:
    return ""
  s = rec["results"]["wall_s"]
  return f"{s / 60:.0f} min {s % 60:.0f} s" if s >= 120 else f"{s:.0f} s"


def _rows_table(head, rows, cells):
  import render  # pylint: disable=g-import-not-at-top

  out, notes, missing = [], [], []
  for label, name in rows:
    rec = load_record(name)
    if rec is None:
      missing.append(name)
      out.append((label, *([""] * (len(head) - 1))))
      continue
    out.append((label, *cells(rec)))
    notes.append(render.provenance(f"quality/{name}.json", rec))
  text = render._table(head, out)  # pylint: disable=protected-access
  if missing:
    text += (
      "\n\nNo record yet, so no figures, for: "
      + ", ".join(f"`{m}`" for m in missing)
      + " (`python benchmarks/reproduce.py --record --rows="
      + ",".join(missing)
      + "`)."
    )
  return text + "\n\n" + "\n".join(f"- {n}" for n in notes)


def beyond_table():
  def cells(rec):
    r = rec["results"]
    return (
      _cell(rec, "map"),
      _cell(rec, "map_tie_aware"),
      _cell(rec, "accuracy"),
      f"{_cell(rec, 'neighbour_recall_at10')} / {_cell(rec, 'neighbour_recall_at100')}",
      _cell(rec, "itq_neighbour_recall_at10"),
      f"{r['distinct_codes']} / {r['num_database']}",
      _wall(rec),
    )

  return _rows_table(
    (
      "preset",
      "mAP",
      "tie-aware mAP",
      "accuracy",
      "neighbour recall@10 / @100",
      "same-run ITQ recall@10",
      "distinct codes",
      "wall",
    ),
    (
      ("`local`", "dhcnn_local"),
      ("`neighbours`", "dhcnn_neighbours"),
      ("`best`", "dhcnn_best"),
      ("`classes` (`best` until 2026-12-04)", "dhcnn_classes"),
    ),
    cells,
  )


def unseen_table():
  def cells(rec):
    return (
      _cell(rec, "map"),
      _cell(rec, "unseen_map"),
      _cell(rec, "unseen_map_itq"),
      _cell(rec, "unseen_map_float"),
      _wall(rec),
    )

  return _rows_table(
    ("preset", "seen mAP", "unseen-class mAP", "unseen, ITQ", "unseen, float features", "wall"),
    (
      ("`local`", "dhcnn_local_unseen25"),
      ("`neighbours`", "dhcnn_neighbours_unseen25"),
      ("`best`", "dhcnn_best_unseen25"),
      ("`classes` (`best` until 2026-12-04)", "dhcnn_classes_unseen25"),
    ),
    cells,
  )


def bits_table():
  def cells(rec):
    return (_cell(rec, "map"), _cell(rec, "map_at_100"), _cell(rec, "accuracy"), _wall(rec))

  return _rows_table(
    ("bits", "mAP", "mAP@100", "accuracy", "wall"),
    (
      ("16, `local,bits=16`", "dhcnn_local_bits16"),
      ("32, `local,bits=32`", "dhcnn_local_bits32"),
      ("48, `local,bits=48`", "dhcnn_local_bits48"),
      ("64, `local`", "dhcnn_local"),
      ("64, official settings (SGD 1e-2 -> 1e-5, theta 1/32)", "dhcnn_official"),
    ),
    cells,
  )


def mrhash_table():
  def cells(rec):
    return (_cell(rec, "map_at_r"), _cell(rec, "map"), _wall(rec))

  return _rows_table(
    ("preset", "mAP@100", "mAP", "wall"),
    (("`configs/mrhash.py:local`", "mrhash_local"), ("`local,itq`", "mrhash_local_itq")),
    cells,
  )


TABLES = {
  "quality_beyond": beyond_table,
  "quality_unseen": unseen_table,
  "quality_bits": bits_table,
  "quality_mrhash": mrhash_table,
}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--workdir", default=None, help="default: a fresh temporary directory")
  p.add_argument("--rows", default=None, help="comma-separated row names (default: short rows)")
  p.add_argument("--all", action="store_true", help="every row, the long ones too")
  p.add_argument("--record", action="store_true", help="write each row's record")
  p.add_argument("--check", action="store_true", help="compare each row with its record")
  args = p.parse_args(argv)
  if not (args.record or args.check):
    p.error("say --record or --check (or both)")
  if args.rows:
    unknown = [n for n in args.rows.split(",") if n not in BY_NAME]
    if unknown:
      p.error(f"unknown rows {unknown}; rows: {', '.join(BY_NAME)}")
    rows = [BY_NAME[n] for n in args.rows.split(",")]
  else:
    rows = [r for r in ROWS if args.all or not r.long]
  if not os.path.isdir(os.path.join(REPO, DATA)):
    raise SystemExit(f"UC Merced not found at {DATA} (beside the repository)")
  import tempfile  # pylint: disable=g-import-not-at-top

  workdir = args.workdir or tempfile.mkdtemp(prefix="reproduce_")
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import _record  # pylint: disable=g-import-not-at-top

  bad = []
  for row in rows:
    old = load_record(row.name)
    try:
      new = run(row, workdir)
    except RuntimeError as e:
      bad.append(str(e))
      print(f"{row.name}: FAILED", flush=True)
      continue
    off = compare(row.name, new, old["results"]) if (args.check and old) else []
    status = "no record" if args.check and not old else ("OFF" if off else "ok")
    print(
      f"{row.name}: {status}  "
      + "  ".join(f"{k}={new[k]:.4f}" for k in FIELDS if k in new and k not in COUNTS)
      + f"  wall {new['wall_s']:.0f} s",
      flush=True,
    )
    bad += off
    if args.record:
      _record.write(record_path(row.name), {"row": row.name, **new}, command=shown(row))
  for line in bad:
    print(line)
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
