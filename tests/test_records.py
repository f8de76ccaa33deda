"""Benchmark records and the docs' tables rendered from them (issue 31, item 1)."""

import glob
import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "benchmarks")
sys.path.insert(0, BENCH)

import _record  # noqa: E402
import render  # noqa: E402
import reproduce  # noqa: E402

RECORDS = sorted(glob.glob(os.path.join(BENCH, "results", "**", "*.json"), recursive=True))


@pytest.mark.parametrize("path", RECORDS, ids=lambda p: os.path.relpath(p, BENCH))
def test_every_record_names_command_commit_date_host_and_versions(path):
  with open(path) as f:
    rec = json.load(f)
  assert set(_record.KEYS) <= set(rec), (path, sorted(set(_record.KEYS) - set(rec)))
  assert rec["command"].startswith("python "), rec["command"]
  assert len(rec["commit"].split("-")[0]) == 40, rec["commit"]
  assert rec["host"]["cores"] and rec["versions"]["python"]


def test_docs_tables_are_what_their_records_render():
  assert render.main(["--check"]) == 0, "run `python benchmarks/render.py` and commit the docs"


def test_every_table_is_shown_and_every_marker_known():
  tables = render.all_tables()
  shown = set()
  for path in render.DOCS:
    with open(path) as f:
      shown.update(m.group(1) for m in render.MARK.finditer(f.read()))
  assert shown == set(tables), (sorted(set(tables) - shown), sorted(shown - set(tables)))


def test_a_changed_figure_is_caught():
  tables = render.all_tables()
  with open(os.path.join(REPO, "docs", "performance.md")) as f:
    text = f.read()
  m = next(render.MARK.finditer(text))
  body = m.group(2)
  digit = next(i for i, ch in enumerate(body) if ch.isdigit())
  tampered = text.replace(body, body[:digit] + str((int(body[digit]) + 1) % 10) + body[digit + 1 :])
  assert render.render_text(tampered, tables) != tampered
  assert render.render_text(render.render_text(tampered, tables), tables) == text


def test_unknown_table_is_an_error():
  with pytest.raises(SystemExit, match="unknown table 'nope'"):
    render.render_text("<!-- table: nope -->\nx\n<!-- /table -->", {}, "page.md")


def test_reproduce_compare_flags_what_moved_beyond_its_tolerance():
  old = {"map": 0.9724, "accuracy": 0.9762, "distinct_codes": 929}
  assert (
    reproduce.compare("r", {"map": 0.9744, "accuracy": 0.9762, "distinct_codes": 940}, old) == []
  )
  off = reproduce.compare("r", {"map": 0.9600, "accuracy": 0.9762, "distinct_codes": 700}, old)
  assert [line.split(":")[0] for line in off] == ["r.map", "r.distinct_codes"]
  assert reproduce.compare("r", {"accuracy": 0.9762, "distinct_codes": 929}, old) == [
    "r.map: recorded 0.9724, missing now"
  ]


def test_reproduce_reads_the_docs_fields_from_results_json():
  res = {
    "map": 0.5,
    "map_at": {"100": 0.6},
    "neighbour_recall_at": {"10": 0.2, "100": 0.4},
    "reference_itq": {"neighbour_recall_at": {"10": 0.3}},
    "distinct_codes": 7,
    "config": {"ignored": True},
  }
  assert reproduce.extract(res) == {
    "map": 0.5,
    "map_at_100": 0.6,
    "neighbour_recall_at10": 0.2,
    "neighbour_recall_at100": 0.4,
    "itq_neighbour_recall_at10": 0.3,
    "distinct_codes": 7,
  }


def test_record_write_keeps_keys_and_raw_values(tmp_path):
  rec = _record.write(str(tmp_path / "r.json"), {"x": _record.spread([3.0, 1.0, 2.0])})
  with open(tmp_path / "r.json") as f:
    assert json.load(f) == rec
  assert rec["results"]["x"] == {"raw": [3.0, 1.0, 2.0], "median": 2.0, "min": 1.0, "max": 3.0}
  assert set(_record.KEYS) <= set(rec)
