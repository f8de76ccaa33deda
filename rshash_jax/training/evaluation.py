"""Evaluation common to all methods: metrics of database/query codes, results.json, plots."""

import json
import os
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
from absl import logging

from rshash_jax import config_defaults, scratch
from rshash_jax.models import signs
from rshash_jax.parallel import distributed
from rshash_jax.retrieval import hamming, metrics


# neighbour_recall_at's k: the true neighbours are a query's k nearest under the reference.
NEIGHBOUR_KS = (10, 100)


def unseen_report(
  db_codes: np.ndarray,
  q_codes: np.ndarray,
  db_labels: np.ndarray,
  q_labels: np.ndarray,
  *,
  db_reference: Optional[np.ndarray] = None,
  q_reference: Optional[np.ndarray] = None,
  itq_codes: Optional[Tuple[np.ndarray, np.ndarray]] = None,
) -> Dict[str, Any]:
  """Retrieval among the images of classes held out of training (data.unseen_classes): mAP
  and tie-aware mAP of the codes, and as references the same ranking by ITQ codes of the
  reference features (`itq_codes`: database, queries) and by the reference features
  themselves (cosine)."""
  bits = db_codes.shape[1]
  db_p, q_p = hamming.pack_codes(signs.signs(db_codes)), hamming.pack_codes(signs.signs(q_codes))
  rep = metrics.retrieval_report(q_p, db_p, q_labels, db_labels, ks=(1,), bits=bits)
  out = {
    "unseen_map": rep["map"],
    "unseen_map_tie_aware": rep["map_tie_aware"],
    "unseen_num_database": rep["num_database"],
    "unseen_num_query": rep["num_query"],
  }
  if itq_codes is not None:
    i_db, i_q = (hamming.pack_codes(signs.signs(c)) for c in itq_codes)
    out["unseen_map_itq"] = metrics.mean_average_precision(i_q, i_db, q_labels, db_labels)
  if db_reference is not None and q_reference is not None:
    out["unseen_map_float"] = metrics.map_by_similarity(
      q_reference, db_reference, q_labels, db_labels
    )
  return out


def evaluate_codes(
  db_codes: np.ndarray,
  q_codes: np.ndarray,
  db_labels: np.ndarray,
  q_labels: np.ndarray,
  *,
  map_ks: Sequence[int] = (),
  ks: Sequence[int] = config_defaults.DHCNN_KS,
  q_predictions: Optional[np.ndarray] = None,
  q_logits: Optional[np.ndarray] = None,
  db_reference: Optional[np.ndarray] = None,
  q_reference: Optional[np.ndarray] = None,
  neighbour_ks: Sequence[int] = NEIGHBOUR_KS,
) -> Dict[str, Any]:
  """Retrieval report of {-1,+1} (or real-valued) codes. With class ids [N]: relevance is
  the same class and `q_predictions` add accuracy; with multi-hot labels [N, C]: relevance
  is sharing a label and `q_logits` add per-label F1 (metrics.multilabel_f1). Every report
  has the tie-aware mAP and the database codes' usage (distinct codes, bit entropy); with
  reference float embeddings of the database and the queries, neighbour_recall_at."""
  bits = db_codes.shape[1]
  db_p, q_p = hamming.pack_codes(signs.signs(db_codes)), hamming.pack_codes(signs.signs(q_codes))
  report = metrics.retrieval_report(q_p, db_p, q_labels, db_labels, map_ks=map_ks, ks=ks, bits=bits)
  scratch.release()
  report["bits"] = int(bits)
  report["bit_balance"] = float(np.mean(signs.bits(np.asarray(db_codes))))
  report.update(metrics.code_usage(db_p, bits=bits))
  if db_reference is not None and q_reference is not None:
    report["neighbour_recall_at"] = metrics.neighbour_recall(
      q_p, db_p, q_reference, db_reference, neighbour_ks
    )
    scratch.release()
  multilabel = np.asarray(q_labels).ndim == 2
  report["relevance"] = "shares at least one label" if multilabel else "same class"
  if multilabel and q_logits is not None:
    f1 = metrics.multilabel_f1(q_logits, q_labels)
    report.update(f1_macro=f1["macro"], f1_micro=f1["micro"], f1_per_label=f1["per_label"])
  elif q_predictions is not None:
    report["accuracy"] = metrics.accuracy(q_predictions, q_labels)
  return report


def commit_run(workdir: str, results: Dict[str, Any], save_encoder, **encoder_kw) -> str:
  """Writes WORKDIR/encoder (save_encoder(path, overwrite=True, **encoder_kw), atomic), then
  results.json naming that encoder's identity and SHA-256, last: a run is complete when its
  results.json names the encoder beside it. A crash between the two leaves no results.json
  of this run (the stale one, if any, is removed first), so a rerun redoes both."""
  path = os.path.join(workdir, "results.json")
  if os.path.exists(path):
    distributed.on_primary(lambda: os.remove(path), "stale results.json removed")
  enc_path = save_encoder(os.path.join(workdir, "encoder"), overwrite=True, **encoder_kw)
  with open(os.path.join(enc_path, "encoder.json")) as f:
    meta = json.load(f)
  results["encoder"] = {"identity": meta["identity"], "sha256": meta.get("params_sha256")}
  return write_results(workdir, results)


def write_results(workdir: str, results: Dict[str, Any]) -> str:
  """WORKDIR/results.json and the P-R / P@k plots next to it, each written atomically by the
  primary process; every process returns once they exist. Call it on every process."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "results.json")

  def write(tmp):
    try:
      plot_curves(results, workdir)
    except Exception as e:  # plots are a convenience: never lose results.json over them
      logging.warning("could not write plots: %s", e)
    with open(tmp, "w") as f:
      json.dump(_jsonable(results), f, indent=1, sort_keys=True)

  distributed.write_once(path, write, name="results.json")
  return path


def _savefig(fig, path: str):
  tmp = f"{path}.tmp{os.getpid()}.png"
  fig.savefig(tmp, dpi=120)
  os.replace(tmp, path)


def _jsonable(x):
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return _jsonable(x.tolist())
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  return x


def plot_curves(results: Dict[str, Any], workdir: str):
  """pr_curve.png (precision vs recall over Hamming radii) and precision_at_k.png."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  title = f"{results.get('method', '')} {results.get('dataset', '')} {results.get('bits', '')} bits"
  pr = results["pr_curve"]
  fig, ax = plt.subplots(figsize=(4.5, 4))
  ax.plot(pr["recall"], pr["precision"], marker="o", ms=3)
  for r, x, y in zip(pr["radius"], pr["recall"], pr["precision"]):
    if r in (0, 1, 2, 4, 8):
      ax.annotate(f"r={r}", (x, y), fontsize=7)
  ax.set(
    xlabel="recall",
    ylabel="precision",
    xlim=(0, 1.02),
    ylim=(0, 1.02),
    title=f"P-R by Hamming radius\n{title}",
  )
  ax.grid(alpha=0.3)
  fig.tight_layout()
  _savefig(fig, os.path.join(workdir, "pr_curve.png"))
  plt.close(fig)
  pk = results["precision_at"]
  ks = sorted(int(k) for k in pk)
  fig, ax = plt.subplots(figsize=(4.5, 4))
  ax.plot(ks, [pk[k] if k in pk else pk[str(k)] for k in ks], marker="o", ms=3)
  ax.set(
    xlabel="number of retrieved images k",
    ylabel="precision@k",
    ylim=(0, 1.02),
    title=f"Precision@k\n{title}",
  )
  ax.grid(alpha=0.3)
  fig.tight_layout()
  _savefig(fig, os.path.join(workdir, "precision_at_k.png"))
  plt.close(fig)


def summary_line(results: Dict[str, Any]) -> str:
  parts = [
    f"{results.get('method')} {results.get('dataset')} {results.get('backbone')} "
    f"{results.get('bits')} bits: mAP={results['map']:.4f}"
  ]
  if "map_tie_aware" in results:
    parts.append(f"tie-aware mAP={results['map_tie_aware']:.4f}")
  for k, v in sorted((int(k), v) for k, v in results.get("map_at", {}).items()):
    parts.append(f"mAP@{k}={v:.4f}")
  if "accuracy" in results:
    parts.append(f"accuracy={results['accuracy']:.4f}")
  if "f1_macro" in results:
    parts.append(f"F1 macro={results['f1_macro']:.4f} micro={results['f1_micro']:.4f}")
  for k, v in sorted((int(k), v) for k, v in results.get("neighbour_recall_at", {}).items()):
    parts.append(f"neighbour recall@{k}={v:.4f}")
  if "reference_itq" in results:
    itq = results["reference_itq"]
    nr = "".join(
      f" recall@{k}={v:.4f}"
      for k, v in sorted((int(k), v) for k, v in itq["neighbour_recall_at"].items())
    )
    parts.append(f"(same-run ITQ: mAP={itq['map']:.4f}{nr})")
  if "distinct_codes" in results:
    parts.append(f"distinct codes={results['distinct_codes']}/{results.get('num_database')}")
  if "unseen_map" in results:
    refs = "".join(
      f" {name}={results[key]:.4f}"
      for name, key in (("ITQ", "unseen_map_itq"), ("float", "unseen_map_float"))
      if key in results
    )
    parts.append(f"unseen-class mAP={results['unseen_map']:.4f} (references:{refs or ' none'})")
  return " ".join(parts)
