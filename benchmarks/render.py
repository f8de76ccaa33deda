"""Render the docs' tables from the benchmark records in benchmarks/results/.

    python benchmarks/render.py           # rewrite every table in docs/ and README.md
    python benchmarks/render.py --check   # exit 1 if any committed table differs

A table in a Markdown file sits between two comments naming it:

    <!-- table: hamming_random -->
    | ... |
    <!-- /table -->

Everything between them is generated: the table and a line naming its record(s) with
command, commit, date and host. Each name below says which record files feed it; a table
whose record is missing is an error, so no figure in those tables lacks a record.
`tests/test_records.py` runs --check in the test command.
"""

import argparse
import glob
import json
import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results")
DOCS = [os.path.join(REPO, "README.md")] + sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))
MARK = re.compile(r"<!-- table: ([a-z0-9_]+) -->\n(.*?)<!-- /table -->", re.S)


def load(name: str) -> dict:
  path = os.path.join(RESULTS, name)
  if not os.path.isfile(path):
    raise SystemExit(f"record {os.path.relpath(path, REPO)} is missing")
  with open(path) as f:
    return json.load(f)


def _host(h: dict) -> str:
  flags = [f for f in h.get("flags", []) if f in ("avx2", "avx512f", "avx512_vpopcntdq")]
  parts = [h.get("cpu") or "unknown CPU", f"{h.get('cores')} cores"]
  if flags:
    parts.append(" ".join(flags))
  if h.get("memory_gb"):
    parts.append(f"{h['memory_gb']} GB")
  parts.append(h.get("accelerator") or "no accelerator")
  return ", ".join(parts)


def provenance(name: str, rec: dict) -> str:
  v = rec.get("versions", {})
  soft = [f"jax {v['jax']}"] if "jax" in v else []
  if "faiss" in v:
    opts = (v.get("faiss_compile_options") or "").strip()
    soft.append(f"FAISS {v['faiss']}" + (f" ({opts})" if opts else ""))
  if v.get("torch") and "torch_config" in v:
    soft.append(f"torch {v['torch']}")
  return (
    f"Record `benchmarks/results/{name}`: `{rec['command']}`; commit {rec['commit'][:7]}, "
    f"{rec['date'][:10]}; {_host(rec['host'])}" + (f"; {', '.join(soft)}" if soft else "") + "."
  )


def _table(header, rows) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
  return "\n".join(lines)


def _range(s: dict, fmt="{:.2f}") -> str:
  return f"{fmt.format(s['median'])} ({fmt.format(s['min'])}..{fmt.format(s['max'])})"


def hamming(kind: str):
  def render():
    name = "hamming_cpu.json"
    rec = load(name)
    r = rec["results"]
    rows = []
    for c in r["cells"]:
      if c["codes"] != kind:
        continue
      rows.append(
        (
          f"{c['n']:,}",
          c["bits"],
          f"{c['ours_qps']:.0f}",
          f"{c['faiss_qps']:.0f}" if c["faiss_qps"] else "",
          f"{c['numpy_qps']:.1f}",
          _range(c["ratio"]) if c["ratio"] else "",
          f"{c['scan_pct_bw']:.0f}",
          f"{c['pct_popcount']:.0f}",
          f"{c['checked_queries'] - c['inexact_queries']} / {c['checked_queries']}",
        )
      )
    head = (
      "N",
      "bits",
      "rshash_jax q/s",
      "FAISS q/s",
      "numpy q/s",
      f"rshash / FAISS, median of {r['pairs']} pairs (min..max)",
      "% bw",
      "% popcnt",
      "exact queries",
    )
    note = (
      f"Q = {r['queries']}, k = {r['k']}, {r['devices']} {r['platform'].upper()} devices; "
      f"read probe {r['read_bandwidth_gbs']:.1f} GB/s, popcount probe "
      f"{r['popcount_words_per_s'] / 1e9:.2f} G words/s"
      + (f"; learned codes flipped with p = {r['flip']}" if kind == "learned" else "")
      + "."
    )
    return _table(head, rows) + "\n\n" + note + "\n" + provenance(name, rec)

  return render


NETWORK_RECORDS = (
  ("features", "efficientnet_lite0", "features_efficientnet_lite0.json"),
  ("features", "vgg_f", "features_vgg_f.json"),
  ("train_step", "efficientnet_lite0", "train_step_efficientnet_lite0.json"),
  ("train_step", "vgg_f", "train_step_vgg_f.json"),
)
NETWORK_NAMES = {"efficientnet_lite0": "EfficientNet-Lite0", "vgg_f": "VGG-F (random weights)"}


def networks():
  rows, notes = [], []
  for kind, bb, name in NETWORK_RECORDS:
    rec = load(name)
    r = rec["results"]
    if kind == "features":
      t = r["torch"]
      rows.append(
        (
          "features, ours with decode + resize (UC Merced WebP)",
          NETWORK_NAMES[bb],
          f"{t['ours_images_per_s']['median']:.1f} "
          f"({t['ours_network_alone_images_per_s']['median']:.1f} network alone)",
          f"{t['peer_images_per_s']['median']:.1f} ({t['peer']})",
          f"{_range(t['ratio'])}; network alone {_range(t['ratio_network_alone'])}",
        )
      )
    else:
      rows.append(
        (
          "DHCNN fine-tuning step (Adam, frozen BN statistics)",
          NETWORK_NAMES[bb],
          f"{r['ours_images_per_s']['median']:.2f}",
          f"{r['peer_images_per_s']['median']:.2f} ({r['peer']})",
          _range(r["ratio"]),
        )
      )
    notes.append(provenance(name, rec))
  head = (
    "benchmark",
    "network",
    "rshash_jax images/s",
    "PyTorch images/s (fastest configuration)",
    "ours / PyTorch, median (min..max)",
  )
  return _table(head, rows) + "\n\n" + "\n".join(f"- {n}" for n in notes)


def peer_configs():
  rows = []
  for kind, bb, name in NETWORK_RECORDS:
    r = load(name)["results"]
    rates = (r["torch"] if kind == "features" else r)["peer_configs_images_per_s"]
    rows.append(
      (
        "features" if kind == "features" else "train step",
        NETWORK_NAMES[bb],
        *(f"{rates[c]:.2f}" if c in rates else "failed" for c in PEER_CONFIGS),
      )
    )
  return _table(("benchmark", "network") + PEER_CONFIGS, rows)


PEER_CONFIGS = (
  "nchw eager",
  "channels_last eager",
  "nchw + torch.compile",
  "channels_last + torch.compile",
)


def serve_hostile():
  name = "serve_hostile.json"
  rec = load(name)
  h = rec["results"]["hostile"]
  c = h["hostile_counts"]
  rows = [
    (
      f"{h['normal_clients']} normal clients, alone",
      f"{h['quiet']['rps']:.1f}",
      f"{h['quiet']['p50_ms']:.1f}",
      f"{h['quiet']['p95_ms']:.1f}",
    ),
    (
      f"{h['normal_clients']} normal clients beside the hostile mix",
      f"{h['beside_hostile_mix']['rps']:.1f}",
      f"{h['beside_hostile_mix']['p50_ms']:.1f}",
      f"{h['beside_hostile_mix']['p95_ms']:.1f}",
    ),
  ]
  note = (
    f"Hostile mix: {c['slow_opened']} slow connections, {c['bomb_413']} decompression bombs "
    f"(all answered 413), {c['large_200']} large images answered. Server RSS "
    f"{h['server_rss_mb_before']:.0f} MB before, peak {h['server_peak_rss_mb']:.0f} MB, "
    f"{h['server_rss_mb_after']:.0f} MB after."
  )
  return (
    _table(("queries", "requests/s", "p50 ms", "p95 ms"), rows)
    + "\n\n"
    + note
    + "\n"
    + provenance(name, rec)
  )


KNN_RECORDS = (
  ("efficientnet_lite0", "ImageNet", "knn_efficientnet_lite0.json"),
  ("efficientnet_lite1", "ImageNet", "knn_efficientnet_lite1.json"),
  ("efficientnet_lite2", "ImageNet", "knn_efficientnet_lite2.json"),
  ("efficientnet_lite0", "random init", "knn_efficientnet_lite0_random.json"),
  ("squeezenet", "ImageNet", "knn_squeezenet.json"),
)


def features_knn():
  rows, notes = [], []
  for bb, weights, name in KNN_RECORDS:
    rec = load(name)
    r = rec["results"]
    rows.append(
      (
        bb,
        weights,
        r["image_size"],
        f"{r['nn_accuracy']:.4f}",
        f"{r['extract_images_per_s']:.1f}",
        f"{r['images'] / r['passes']['max']:.1f}..{r['images'] / r['passes']['min']:.1f} "
        f"({len(r['passes']['raw'])} passes)",
      )
    )
    notes.append(provenance(name, rec))
  head = (
    "backbone",
    "weights",
    "input",
    "1-NN accuracy",
    "images/s (decode + resize + CNN), median",
    "range",
  )
  return _table(head, rows) + "\n\n" + "\n".join(f"- {n}" for n in notes)


def serve_load():
  rows, notes = [], []
  for name in ("serve_lite0.json", "serve_tiny.json"):
    rec = load(name)
    r = rec["results"]
    for row in r["rows"]:
      rows.append(
        (
          f"{r['backbone']}, {r['bits']} bits",
          row["clients"],
          row["requests"],
          f"{row['rps']:.1f}",
          f"{row['p50_ms']:.1f}",
          f"{row['p99_ms']:.1f}",
        )
      )
    notes.append(provenance(name, rec))
  head = ("encoder", "clients", "requests", "requests/s", "p50 ms", "p99 ms")
  return _table(head, rows) + "\n\n" + "\n".join(f"- {n}" for n in notes)


def _ms(s: dict, key: str, pct: bool = False) -> str:
  m = s[key]
  if pct:
    return f"{100 * m['mean']:.0f}%"
  return f"{m['mean']:.4f} +- {m['std']:.4f}"


def selection_validation(name: str):
  def render():
    rec = load(name)
    r = rec["results"]
    rows = []
    for setting, _ in r["grid"]["settings"]:
      s = r["summary"][setting]
      label = setting + (" (chosen)" if setting == r["chosen"] else "")
      for bits in r["grid"]["bits"]:
        b = s[str(bits)]
        rows.append(
          (
            label,
            f"{s['score']:.4f}",
            bits,
            _ms(b, "map_tie_aware"),
            _ms(b, "neighbour_recall_at10"),
            _ms(b, "unseen_map_tie_aware"),
            _ms(b, "distinct_fraction", pct=True),
          )
        )
    head = (
      "setting",
      "score",
      "bits",
      "tie-aware mAP",
      "neighbour recall@10",
      "unseen-class mAP",
      "distinct",
    )
    refs = []
    for bits in r["grid"]["bits"]:
      b = r["summary"][r["chosen"]][str(bits)]
      refs.append(
        f"{bits} bits: ITQ neighbour recall@10 {b['itq_neighbour_recall_at10']['mean']:.4f}, "
        f"ITQ unseen-class mAP {b['unseen_map_itq']['mean']:.4f}, float features "
        f"{b['unseen_map_float']['mean']:.4f}"
      )
    note = (
      f"Validation, mean +- std over seeds {', '.join(map(str, r['grid']['seeds']))}; "
      f"rule: {r['rule']}. The chosen setting's runs' references (its backbone's "
      "features): " + "; ".join(refs) + "."
    )
    return _table(head, rows) + "\n\n" + note + "\n" + provenance(name, rec)

  return render


def selection_test(name: str):
  def render():
    rec = load(name)
    t = rec["results"]["test"]
    by = {}
    for row in t["rows"]:
      by.setdefault((row["setting"], row["bits"]), {})[row["unseen_classes"]] = row
    rows = []
    for (setting, bits), pair in by.items():
      a, u = pair.get(0.0), pair.get(0.25)
      rows.append(
        (
          setting,
          bits,
          f"{a['map']:.4f}",
          f"{a['map_tie_aware']:.4f}",
          f"{a['neighbour_recall_at10']:.4f} ({a['itq_neighbour_recall_at10']:.4f})",
          f"{100 * a['distinct_fraction']:.0f}%",
          f"{u['unseen_map']:.4f} ({u['unseen_map_itq']:.4f}, {u['unseen_map_float']:.4f})"
          if u
          else "",
        )
      )
    head = (
      "setting",
      "bits",
      "mAP",
      "tie-aware mAP",
      "neighbour recall@10 (ITQ)",
      "distinct",
      "unseen-class mAP, index order (ITQ, float)",
    )
    when = t.get("date", rec["date"])[:10]
    note = f"Test split, seed 0: `{t['command']}`" + (
      f", commit {t['commit'][:7]}, {when}." if t.get("commit") else "."
    )
    return _table(head, rows) + "\n\n" + note

  return render


def scale_decode():
  name = "scale.json"
  rec = load(name)
  r = rec["results"]
  rates = r["decode_images_per_s"]
  rows = [(t, _range(v, "{:.0f}")) for t, v in rates.items()]
  runs = len(next(iter(rates.values()))["raw"])
  head = ("threads", f"decode + resize to 224 px, images/s: median of {runs} (min..max)")
  return _table(head, rows) + "\n\n" + provenance(name, rec)


def _anon(m) -> str:
  """A peak RssAnon cell: the median (min..max) of repeated runs, or the one run's."""
  a = (m.get("runs") or {}).get("peak_rss_anon_mib")
  if not a:
    return f"{m['peak_rss_anon_mib']:.0f}"
  return f"{a['median']:.0f} ({a['min']:.0f}..{a['max']:.0f})"


def _repeats(entries) -> str:
  n = {m.get("repeats", 1) for m in entries}
  return "" if n == {1} else f" (median of {', '.join(str(x) for x in sorted(n))} runs)"


def scale_memory():
  name = "scale.json"
  rec = load(name)
  r = rec["results"]
  what = {"extract": "feature extraction + training + eval", "cached": "training + eval (cached)"}
  rows = [
    (
      f"{m['images']:,}",
      what[m["run"]],
      f"{m['wall_s']:.0f}",
      _anon(m),
      f"{m['peak_vmrss_mib']:.0f}",
    )
    for m in r["memory"]
  ]
  head = ("images", "run" + _repeats(r["memory"]), "wall s", "peak RssAnon MiB", "peak VmRSS MiB")
  procs = [(f"{p['processes']} x {p['devices']}", f"{p['wall_s']:.1f}") for p in r["processes"]]
  return (
    _table(head, rows)
    + "\n\n"
    + _table(("processes x devices", "training + eval wall s (cached features)"), procs)
    + "\n\n"
    + provenance(name, rec)
  )


def scale_mrhash():
  name = "scale_mrhash.json"
  rec = load(name)
  rows = [
    (
      f"{m['images']:,}",
      f"{m['wall_s']:.0f}",
      _anon(m),
      f"{m['peak_vmrss_mib']:.0f}",
    )
    for m in rec["results"]["mrhash_memory"]
  ]
  mem = rec["results"]["mrhash_memory"]
  head = ("images" + _repeats(mem), "MrHash wall s", "peak RssAnon MiB", "peak VmRSS MiB")
  return _table(head, rows) + "\n\n" + provenance(name, rec)


def multi_index_cpu():
  name = "multi_index_cpu.json"
  rec = load(name)
  r = rec["results"]
  rows = []
  for c in r["cells"]:
    mi = c["multi_index"]
    fm = mi["faiss_multihash"] or {}
    rows.append(
      (
        c["codes"],
        f"{c['n']:,}",
        c["bits"],
        mi["substrings"],
        f"{c['mean_kth_distance']:.1f}",
        f"{c['ours_qps']:.0f}",
        f"{mi['qps']:.0f}",
        _range(mi["vs_scan"]),
        f"{100 * mi['scan_share']:.0f}%",
        f"{fm['qps']:.0f} (nflip {fm['nflip']}, {fm['exact_queries']} exact)" if fm else "",
        _range(fm["ratio"]) if fm else "",
        f"{mi['build_s']:.1f} / {mi['table_bytes'] / 2**20:.0f}",
        mi["inexact_queries"],
      )
    )
  head = (
    "codes",
    "N",
    "bits",
    "m",
    "mean k-th distance",
    "scan q/s",
    "multi-index q/s",
    f"multi-index / scan, {r['pairs']} runs (min..max)",
    "queries it handed to the scan",
    "FAISS multi-hash q/s",
    "multi-index / FAISS multi-hash",
    "build s / tables MiB",
    "queries unlike the scan (all runs)",
  )
  note = (
    f"Q = {r['queries']}, k = {r['k']}, {r['devices']} {r['platform'].upper()} devices for the "
    "scan; the multi-index and FAISS's multi-hash search on the host (numpy; FAISS's "
    "threads)" + (f"; learned codes flipped with p = {r['flip']}" if r.get("flip") else "") + "."
  )
  return _table(head, rows) + "\n\n" + note + "\n" + provenance(name, rec)


def scenes():
  name = "scenes.json"
  rec = load(name)
  r = rec["results"]
  rows = [
    (
      e["archive"],
      f"{e['items']:,}",
      f"{e['wall_s']:.0f}",
      f"{e['items_per_s']:.1f}",
      f"{e['peak_rss_anon_mib']:.0f}",
      f"{e['peak_vmrss_mib']:.0f}",
    )
    for e in r["encode"]
  ]
  head = ("encode", "windows / images", "wall s", "per s", "peak RssAnon MiB", "peak VmRSS MiB")
  ret = [(q["archive"], f"{q['p_at_10']:.4f}", f"{q['p_at_100']:.4f}") for q in r["retrieval"]]
  ex = r["exact_windows"]
  note = (
    f"Scenes: {r['scenes']} of {r['cells']} x {r['cells']} cells of 256 px "
    f"({r['pixel_bytes'] / 1e9:.2f} GB of pixels, two UTM zones); small: "
    f"{r['small_cells']} x {r['small_cells']} cells ({r['small_pixel_bytes'] / 1e9:.2f} GB). "
    f"Windows/s / files' images/s: {r['ratios']['windows_per_s_vs_files']:.2f}; peak RssAnon "
    f"full / small: {r['ratios']['rss_anon_full_vs_small']:.3f}. Unrotated 256-px cells: "
    f"{ex['equal_codes']} of {ex['checked']} windows have their file's code."
  )
  return (
    _table(head, rows)
    + "\n\n"
    + _table((f"{r['queries']} held-out queries against", "P@10", "P@100"), ret)
    + "\n\n"
    + note
    + "\n"
    + provenance(name, rec)
  )


TABLES = {
  "scenes": scenes,
  "multi_index_cpu": multi_index_cpu,
  "scale_decode": scale_decode,
  "scale_memory": scale_memory,
  "scale_mrhash": scale_mrhash,
  "hamming_random": hamming("random"),
  "hamming_learned": hamming("learned"),
  "networks_cpu": networks,
  "peer_configs_cpu": peer_configs,
  "features_knn": features_knn,
  "serve_hostile": serve_hostile,
  "serve_load": serve_load,
  "neighbours_validation": selection_validation("dhcnn_neighbours_selection.json"),
  "neighbours_test": selection_test("dhcnn_neighbours_selection.json"),
  "listwise_validation": selection_validation("dhcnn_listwise_selection.json"),
  "partial_validation": selection_validation("dhcnn_partial_selection.json"),
  "listwise_test": selection_test("dhcnn_listwise_selection.json"),
  "local_validation": selection_validation("dhcnn_local_selection.json"),
  "local_test": selection_test("dhcnn_local_selection.json"),
}


def _extra_tables():
  """Tables that other modules register (benchmarks/reproduce.py's quality rows)."""
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import reproduce  # pylint: disable=g-import-not-at-top

  return reproduce.TABLES


def all_tables() -> dict:
  return {**TABLES, **_extra_tables()}


def render_text(text: str, tables: dict, path: str = "") -> str:
  def sub(m):
    name = m.group(1)
    if name not in tables:
      raise SystemExit(f"{path}: unknown table {name!r} (benchmarks/render.py TABLES)")
    return f"<!-- table: {name} -->\n{tables[name]()}\n<!-- /table -->"

  return MARK.sub(sub, text)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--check", action="store_true", help="exit 1 if a committed table differs")
  args = p.parse_args(argv)
  tables, stale, seen = all_tables(), [], set()
  for path in DOCS:
    with open(path) as f:
      text = f.read()
    seen.update(m.group(1) for m in MARK.finditer(text))
    new = render_text(text, tables, path)
    if new != text:
      stale.append(os.path.relpath(path, REPO))
      if not args.check:
        with open(path, "w") as f:
          f.write(new)
  unused = sorted(set(tables) - seen)
  if unused:
    print(f"tables no page shows: {', '.join(unused)}")
  if args.check and stale:
    print(
      "tables differ from their records in: "
      + ", ".join(stale)
      + " (python benchmarks/render.py rewrites them)"
    )
    return 1
  if not args.check:
    print(f"rendered; changed: {', '.join(stale) or 'nothing'}")
  return 1 if args.check and unused else 0


if __name__ == "__main__":
  sys.exit(main())
