"""Multi-label archives: a label file, DHCNN with a sigmoid loss, per-label F1, search."""

import json
import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from rshash_jax import commands, errors
from rshash_jax.data import datasets, input_pipeline
from rshash_jax.models import dhcnn
from rshash_jax.retrieval import hits, metrics
from rshash_jax.training import train_dhcnn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
import dhcnn as dhcnn_config  # noqa: E402

LABELS = ["water", "trees", "buildings", "road"]


# Each label adds its own colour (and texture): water blue, trees green, buildings red,
# road grey. With one or two labels per image, every label is linearly separable.
_COLOURS = {0: (0, 0, 1), 1: (0, 1, 0), 2: (1, 0, 0), 3: (1, 1, 1)}


def _scene(rng, labels, size=32):
  img = rng.normal(40, 12, (size, size, 3))
  yy, xx = np.mgrid[:size, :size]
  for k in labels:
    texture = 20 * np.sin((xx if k % 2 else yy) * (0.4 + 0.5 * k))
    img += (70 + texture)[..., None] * np.asarray(_COLOURS[k], np.float64)
  return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
  root = tmp_path_factory.mktemp("ml")
  rng = np.random.default_rng(0)
  lines = ["path,labels"]
  for i in range(72):
    labs = sorted(set(rng.choice(4, rng.integers(1, 3), replace=False).tolist()))
    rel = f"tiles/t{i:03d}.png"
    os.makedirs(root / "tiles", exist_ok=True)
    Image.fromarray(_scene(rng, labs)).save(root / rel)
    lines.append(f"{rel},{';'.join(LABELS[k] for k in labs)}")
  (root / "labels.csv").write_text("\n".join(lines) + "\n")
  return root


def test_label_file_table_and_errors(archive, tmp_path):
  table = datasets.label_file(str(archive / "labels.csv"), str(archive))
  assert table.multilabel and table.labels.shape == (72, 4) and table.class_names == sorted(LABELS)
  assert (table.labels.sum(1) >= 1).all()
  tr, te = datasets.split_per_class(table.labels, 0.75, 0)
  assert len(tr) == 54 and len(te) == 18 and not set(tr) & set(te)
  bad = tmp_path / "bad.csv"
  bad.write_text("tiles/t000.png,water\nmissing.png,road\n")
  with pytest.raises(errors.NotFound, match=r"bad.csv:2: image not found: .*missing.png"):
    datasets.label_file(str(bad), str(archive))
  bad.write_text("tiles/t000.png,\n")
  with pytest.raises(errors.InvalidInput, match=r"bad.csv:1: tiles/t000.png has no label"):
    datasets.label_file(str(bad), str(archive))


def test_multilabel_f1_and_sigmoid_loss():
  labels = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0]])
  logits = np.array([[2.0, -1.0, -3.0], [-1.0, 0.5, 0.2], [0.1, 3.0, -1.0]])
  f1 = metrics.multilabel_f1(logits, labels)
  # label 0: TP 2; label 1: TP 2; label 2: FN 1 + FP 1.
  np.testing.assert_allclose(f1["per_label"], [1.0, 1.0, 0.0])
  assert f1["macro"] == pytest.approx(2 / 3) and f1["micro"] == pytest.approx(8 / 10)
  # The classification term for multi-hot labels is the mean sigmoid cross entropy.
  u = jnp.zeros((3, 4), jnp.float32)
  out = dhcnn.loss_fn(
    u,
    jnp.asarray(logits, jnp.float32),
    jnp.asarray(labels),
    jnp.arange(3),
    jnp.zeros((3, 4)),
    jnp.asarray(labels),
    eta=0.0,
    beta=0.0,
    theta_scale=1.0,
    num_classes=3,
  )
  want = np.mean(np.log1p(np.exp(logits)) - labels * logits, axis=1).mean()
  assert float(out["ce"]) == pytest.approx(want, rel=1e-5)


def test_dhcnn_trains_on_a_label_file_and_search_uses_shared_labels(archive, tmp_path):
  c = dhcnn_config.get_config("tiny")
  c.data.source, c.data.labels_file = f"folder:{archive}", str(archive / "labels.csv")
  # The tiny random CNN's features are small (~0.2): with the paper's beta = 25 the
  # quantisation term pins u to the hash layer's bias and every code is the same (mAP =
  # chance, 0.60 here, while the classifier still learns). beta = 1 lets the codes follow.
  c.dhcnn.beta = 1.0
  res = train_dhcnn.train_and_evaluate(c, str(tmp_path / "w"))
  assert res["relevance"] == "shares at least one label" and "accuracy" not in res
  assert len(res["f1_per_label"]) == 4 and 0.0 <= res["f1_macro"] <= 1.0
  saved = json.load(open(tmp_path / "w" / "results.json"))
  assert saved["f1_macro"] == res["f1_macro"] and saved["relevance"] == res["relevance"]
  # Well above chance: a random ranking scores mAP ~0.57 here, all-negative F1 0.
  assert res["f1_micro"] > 0.8 and res["map"] > 0.75, (res["f1_micro"], res["map"])
  codes = commands.encode(
    str(tmp_path / "w"),
    str(archive),
    str(tmp_path / "c.npz"),
    labels_file=str(archive / "labels.csv"),
  )
  z = np.load(codes)
  assert z["labels"].shape == (72, 4)
  query = str(archive / "tiles" / "t005.png")
  out = commands.search(str(tmp_path / "w"), codes, [query], k=6)[0]
  q_labels = set(
    datasets.label_file(str(archive / "labels.csv"), str(archive)).labels[5].nonzero()[0]
  )
  names = sorted(LABELS)
  for h in out["results"]:
    hit_labels = {names.index(n) for n in h["label"].split(";")}
    assert h["relevant"] == bool(hit_labels & q_labels)
  assert out["results"][0]["distance"] == 0  # the query itself is in the archive
  # The service shows the same query the same way: one hit formatter, one multi-label rule
  # (every label whose logit is > 0), the query's labels marking the hits relevant.
  from rshash_jax.serving import service  # pylint: disable=g-import-not-at-top

  engine = service.SearchEngine(str(tmp_path / "w"), codes, max_batch=1)
  try:
    served = engine.search_pixels(
      input_pipeline.decode_file(query).numpy(), 6, engine.archive.labels[5]
    )
  finally:
    engine.close()
  assert served["predicted"] == out["predicted"]
  assert [
    {k: h[k] for k in ("id", "path", "label", "distance", "relevant")} for h in served["hits"]
  ] == [{k: h[k] for k in ("id", "path", "label", "distance", "relevant")} for h in out["results"]]
  pred = out["predicted"]
  assert pred == "-" or set(pred.split(";")) <= set(LABELS)


def test_one_prediction_rule_for_single_and_multi_label_encoders():
  names = ["a", "b", "c"]
  res = {"predicted": np.array([2, 0]), "logits": np.array([[0.5, -1.0, 2.0], [-0.1, -0.2, -0.3]])}
  assert hits.predicted(names, True, res, 0) == "a;c"  # every label with logit > 0
  assert hits.predicted(names, True, res, 1) == "-"
  assert hits.predicted(names, False, res, 0) == "c"  # the argmax class
  assert hits.predicted([], False, res, 0) is None and hits.predicted(names, False, {}, 0) is None
  archive = hits.Archive(
    {
      "paths": np.array(["x/a/1.png", "x/b/2.png"]),
      "labels": np.array([[1, 0, 1], [0, 1, 0]]),
      "class_names": np.array(names),
    }
  )
  assert archive.label(0) == "a;c" and archive.relevant(0, np.array([0, 0, 1])) is True
  assert (
    archive.relevant(1, np.array([1, 0, 1])) is False and archive.relevant(1, np.int64(-1)) is None
  )
  assert archive.entry(1) == {"id": 1, "path": "x/b/2.png", "label": "b", "lon": None, "lat": None}
