"""DHCNN end to end: CLI run, resume == uninterrupted, bad inputs, data splits and pipelines."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from rshash_jax.data import datasets, input_pipeline
from rshash_jax.training import train_dhcnn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
import dhcnn as dhcnn_config  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED = (
  "method",
  "dataset",
  "backbone",
  "bits",
  "num_database",
  "num_query",
  "map",
  "map_at",
  "precision_at",
  "pr_curve",
  "accuracy",
)


def _tiny(tmp_path, *items, **overrides):
  c = dhcnn_config.get_config(",".join(("tiny",) + items))
  c.data.generated_per_class = 10
  c.train.epochs = 4
  for k, v in overrides.items():
    node = c
    *path, leaf = k.split("__")
    for p in path:
      node = node[p]
    node[leaf] = v
  return c


def test_cli_tiny_run_writes_results(tmp_path):
  workdir = tmp_path / "run"
  cmd = [
    sys.executable,
    "-m",
    "rshash_jax.main",
    "--config=configs/dhcnn.py:tiny",
    f"--workdir={workdir}",
    "--config.data.generated_per_class=10",
  ]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "mAP=" in proc.stdout
  res = json.loads((workdir / "results.json").read_text())
  for key in REQUIRED:
    assert key in res, key
  assert res["num_database"] + res["num_query"] == 60 and res["num_query"] == 12
  # Chance is ~0.2 on 6 classes; this run gives 0.76.
  assert res["map"] >= 0.7 and res["bits"] == 16, res["map"]
  assert (
    set(res["pr_curve"]) >= {"radius", "precision", "recall"}
    and len(res["pr_curve"]["radius"]) == 17
  )
  assert (workdir / "pr_curve.png").stat().st_size > 1000
  assert "generated" in res["dataset_description"]
  timing = res["timing"]  # this run's phases, comparable across settings
  assert set(timing) == {
    "data_and_features_seconds",
    "train_seconds",
    "train_steps",
    "eval_seconds",
  }
  assert timing["train_steps"] == 30 * 6 and all(v > 0 for v in timing.values())


def test_cli_rejects_bad_config_value(tmp_path):
  cmd = [
    sys.executable,
    "-m",
    "rshash_jax.main",
    "--config=configs/dhcnn.py:tiny",
    f"--workdir={tmp_path}",
    "--config.train.mode=sideways",
  ]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert "config.train.mode='sideways' is invalid" in proc.stderr


@pytest.mark.parametrize("mode", ["finetune", "frozen"])
def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, mode):
  c = _tiny(tmp_path, f"mode={mode}", train__checkpoint_every_steps=4)
  full = train_dhcnn.train_and_evaluate(c, str(tmp_path / "full"))
  c_int = _tiny(
    tmp_path, f"mode={mode}", train__checkpoint_every_steps=4, train__max_steps_per_run=7
  )
  part = train_dhcnn.train_and_evaluate(c_int, str(tmp_path / "resumed"))
  assert part == {}  # stopped early, checkpointed
  assert not (tmp_path / "resumed" / "results.json").exists()
  c_int.unlock()
  c_int.train.max_steps_per_run = 0
  resumed = train_dhcnn.train_and_evaluate(c_int, str(tmp_path / "resumed"))
  assert resumed["step"] == full["step"] == 4 * (48 // 8)
  for key in ("map", "accuracy", "map_at", "precision_at", "pr_curve"):
    assert resumed[key] == full[key], key


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  c = _tiny(tmp_path, train__checkpoint_every_steps=4, train__max_steps_per_run=4)
  train_dhcnn.train_and_evaluate(c, str(tmp_path / "w"))
  c = _tiny(tmp_path, train__checkpoint_every_steps=4, train__lr_start=1e30, train__lr_end=1e30)
  with pytest.raises(
    FloatingPointError, match=r"non-finite loss at step \d+.*last good checkpoint \(step 4\)"
  ):
    train_dhcnn.train_and_evaluate(c, str(tmp_path / "w"))
  assert max(int(d) for d in os.listdir(tmp_path / "w" / "checkpoints") if d.isdigit()) == 4


def test_checkpoint_of_another_config_is_rejected(tmp_path):
  c = _tiny(tmp_path, train__max_steps_per_run=2, train__checkpoint_every_steps=2)
  train_dhcnn.train_and_evaluate(c, str(tmp_path / "w"))
  c = _tiny(tmp_path, "bits=32", train__max_steps_per_run=2)
  with pytest.raises(
    ValueError, match="do not match this config: model.bits: 16 in the checkpointed run, 32 now"
  ):
    train_dhcnn.train_and_evaluate(c, str(tmp_path / "w"))
  # Another global batch would silently continue on another data order: refused, named.
  c = _tiny(tmp_path, train__max_steps_per_run=2, train__batch_size=16)
  with pytest.raises(ValueError, match="train.batch_size: 8 in the checkpointed run, 16 now"):
    train_dhcnn.train_and_evaluate(c, str(tmp_path / "w"))
  # What may change between runs of one training (learning rate, epochs) is accepted.
  c = _tiny(tmp_path, train__max_steps_per_run=2, train__lr_start=1e-3, train__epochs=5)
  assert train_dhcnn.train_and_evaluate(c, str(tmp_path / "w")) == {}
  # Without run.json (removed, or an older layout) the state's shapes refuse it, before
  # orbax starts reading: a refusal leaves no un-awaited restore behind (pyproject turns
  # an unraisable exception into a failure, conftest an asyncio error log).
  os.remove(tmp_path / "w" / "checkpoints" / "run.json")
  c = _tiny(tmp_path, "bits=32", train__max_steps_per_run=2)
  with pytest.raises(
    ValueError,
    match=r"cannot restore checkpoint 4 .*: params/head/classifier/kernel: "
    r"float32\[16, 6\] in the checkpoint, float32\[32, 6\] now",
  ):
    train_dhcnn.train_and_evaluate(c, str(tmp_path / "w"))


def test_missing_dataset_and_corrupt_image_are_named(tmp_path):
  c = _tiny(tmp_path, data__source=f"folder:{tmp_path / 'nowhere'}")
  with pytest.raises(FileNotFoundError, match="nowhere"):
    train_dhcnn.train_and_evaluate(c, str(tmp_path / "w"))
  root = tmp_path / "folder"
  for cls in ("a", "b"):
    (root / cls).mkdir(parents=True)
    for i in range(3):
      Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / cls / f"{i}.png")
  (root / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
  c = _tiny(tmp_path, data__source=f"folder:{root}")
  with pytest.raises(ValueError, match="broken.jpg"):
    train_dhcnn.train_and_evaluate(c, str(tmp_path / "w2"))


def test_class_folder_ids_and_split_are_stable(tmp_path):
  table = datasets.generate(str(tmp_path), num_classes=3, per_class=7, size=16)
  again = datasets.class_folder(os.path.dirname(table.paths[0]) + "/..")
  assert [os.path.basename(p) for p in again.paths] == [os.path.basename(p) for p in table.paths]
  assert table.class_names == ["class00", "class01", "class02"]
  tr, te = datasets.split_per_class(table.labels, 0.8, seed=3)
  tr2, te2 = datasets.split_per_class(table.labels, 0.8, seed=3)
  np.testing.assert_array_equal(tr, tr2)
  assert len(np.intersect1d(tr, te)) == 0 and len(tr) + len(te) == 21
  assert all(np.sum(table.labels[tr] == c) == 6 for c in range(3))  # round(0.8 * 7) per class
  tr3, _ = datasets.split_per_class(table.labels, 0.8, seed=4)
  assert not np.array_equal(tr, tr3)
  with pytest.raises(ValueError, match="train_ratio"):
    datasets.split_per_class(table.labels, 1.5, seed=0)


def test_eval_batches_cover_every_example_once(tmp_path):
  table = datasets.generate(str(tmp_path), num_classes=3, per_class=7, size=16)
  source = input_pipeline.ImageSource(table, 16)
  idx = np.arange(3, 21)
  seen, padded = [], 0
  for b in input_pipeline.eval_batches(source, idx, global_batch=8):
    assert b["image"].shape == (8, 16, 16, 3)
    seen += b["id"][b["mask"]].tolist()
    padded += int((~b["mask"]).sum())
  assert sorted(seen) == idx.tolist() and padded == 6


def test_train_batches_resume_mid_epoch(tmp_path):
  table = datasets.generate(str(tmp_path), num_classes=3, per_class=7, size=16)
  source = input_pipeline.ImageSource(table, 16)
  idx = np.arange(21)
  full = [
    b["id"] for b in input_pipeline.train_batches(source, idx, global_batch=4, seed=1, num_steps=12)
  ]
  tail = [
    b["id"]
    for b in input_pipeline.train_batches(
      source, idx, global_batch=4, seed=1, start_step=7, num_steps=12
    )
  ]
  assert len(full) == 12 and all(len(set(b)) == 4 for b in full)
  for a, b in zip(full[7:], tail):
    np.testing.assert_array_equal(a, b)
  assert jax.process_count() == 1


def test_partial_finetune_with_cached_activations_equals_without(tmp_path):
  """train.finetune_from=conv2 (tiny_cnn): conv1 frozen (the saved encoder keeps it as it
  was), conv2 trained with the head; running conv1 once into the activation cache or in
  every step trains the same model. (EfficientNet-Lite's split: test_backbones.)"""
  from rshash_jax.models import backbones  # pylint: disable=g-import-not-at-top
  from rshash_jax.retrieval import encoder  # pylint: disable=g-import-not-at-top

  runs = {
    cache: train_dhcnn.train_and_evaluate(
      _tiny(tmp_path, "mode=finetune", train__finetune_from="conv2", train__finetune_cache=cache),
      str(tmp_path / cache),
    )
    for cache in ("yes", "no")
  }
  assert runs["yes"]["activation_cache"] and not runs["no"]["activation_cache"]
  assert runs["yes"]["finetune_from"] == "conv2"
  np.testing.assert_allclose(runs["yes"]["map"], runs["no"]["map"], atol=1e-6)
  store = [d for d in os.listdir(tmp_path / "yes" / "cache") if d.startswith("activations_")]
  assert len(store) == 1  # one chunk store of the frozen layers' output
  init = backbones.create("tiny_cnn", pretrained=False, seed=0).variables["params"]
  got = {
    c: encoder.load_encoder(str(tmp_path / c / "encoder")).variables["params"]["backbone"]
    for c in runs
  }
  for name in ("conv1", "conv2"):
    for c in got:
      same = all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(init[name]), jax.tree.leaves(got[c][name]))
      )
      assert same == (name == "conv1"), (c, name)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), got["yes"][name], got["no"][name]
    )


def test_cached_views_are_the_dihedral_views_of_each_image(tmp_path):
  """train.cached_views=3 with data.augment: the store holds the frozen layers' output for the
  first 3 dihedral views (as is, left-right flip, up-down flip) of every image."""
  from rshash_jax.data import features  # pylint: disable=g-import-not-at-top
  from rshash_jax.models import backbones  # pylint: disable=g-import-not-at-top

  c = _tiny(tmp_path)
  table = datasets.from_config(c.data, str(tmp_path))
  bb = backbones.create("efficientnet_lite0", pretrained=False, image_size=32, seed=0)
  acts = features.cached_activations(
    bb, table, str(tmp_path / "cache"), "blocks_3", views=3, batch_size=16
  )
  assert acts.shape == (len(table), 3, *features.activation_shape(bb, "blocks_3"))
  images = next(
    input_pipeline.eval_batches(input_pipeline.ImageSource(table, 32), np.arange(4), global_batch=4)
  )
  x = bb.preprocessing(images["image"])
  for v, flip in enumerate((lambda a: a, lambda a: a[:, :, ::-1], lambda a: a[:, ::-1])):
    want = bb.module.apply(bb.variables, flip(x), stop="blocks_3")["activation"]
    np.testing.assert_allclose(acts[images["pos"], v], want, rtol=1e-4, atol=1e-5)
  img = np.arange(12.0).reshape(1, 3, 4, 1)
  seen = {
    features.dihedral(img, v).tobytes() + bytes(features.dihedral(img, v).shape[1:3])
    for v in range(8)
  }
  assert len(seen) == 8  # eight different views: the whole dihedral group


@pytest.mark.parametrize(
  "overrides,message",
  [
    (dict(train__finetune_from="blocks_3"), "needs train.mode=finetune"),
    (
      dict(train__mode="finetune", train__finetune_from="blocks_3", model__backbone="squeezenet"),
      "needs a backbone with split points",
    ),
    (
      dict(train__mode="finetune", train__finetune_from="blocks_3"),
      "split point of tiny_cnn: conv2",
    ),
    (
      dict(
        train__mode="finetune",
        train__finetune_from="blocks_16",
        model__backbone="efficientnet_lite0",
      ),
      "blocks_0 .. blocks_15, head",
    ),
    (
      dict(
        train__mode="finetune",
        train__finetune_from="head",
        model__backbone="efficientnet_lite0",
        train__cached_views=9,
      ),
      "train.cached_views=9",
    ),
    (
      dict(
        train__mode="finetune",
        train__finetune_from="head",
        model__backbone="efficientnet_lite0",
        train__finetune_cache="maybe",
      ),
      "train.finetune_cache='maybe'",
    ),
    (dict(dhcnn__center_weight=-1.0), "dhcnn.center_weight=-1.0"),
    (dict(data__unseen_classes=1.0), "data.unseen_classes=1.0"),
    (dict(data__unseen_classes=-0.1), "data.unseen_classes=-0.1"),
    (dict(eval__reference="clip"), "eval.reference='clip'"),
  ],
)
def test_partial_finetune_and_center_settings_are_checked(tmp_path, overrides, message):
  from rshash_jax import errors  # pylint: disable=g-import-not-at-top
  from rshash_jax.training import config_checks  # pylint: disable=g-import-not-at-top

  with pytest.raises(errors.InvalidInput, match=message.replace(".", r"\.").replace("(", r"\(")):
    config_checks.check_dhcnn(_tiny(tmp_path, **overrides))


@pytest.mark.parametrize("mode", ["frozen", "finetune"])
def test_unseen_classes_are_held_out_and_every_measure_is_reported(tmp_path, mode):
  """data.unseen_classes: the held-out classes never enter training (no image, no label);
  their images are ranked among themselves beside the run's ITQ and float references, and
  results.json carries the tie-aware mAP, neighbour recall and code usage (issue 29)."""
  c = _tiny(tmp_path, data__unseen_classes=0.34, train__mode=mode, train__epochs=2)
  s = train_dhcnn._setup(c, str(tmp_path / "w"))
  held = datasets.hold_out_classes(s.table.labels, 0.34, c.data.seed)
  assert len(held) == 2  # round(0.34 x 6)
  seen = np.setdiff1d(np.arange(6), held)
  assert set(s.table.labels[s.train_idx]) == set(seen) == set(s.table.labels[s.test_idx])
  assert set(s.table.labels[s.unseen_db]) == set(held) == set(s.table.labels[s.unseen_q])
  everything = np.concatenate([s.train_idx, s.test_idx, s.unseen_db, s.unseen_q])
  assert sorted(everything) == list(range(60))  # every image once
  res = train_dhcnn.train_and_evaluate(c, str(tmp_path / "w"))
  saved = json.loads((tmp_path / "w" / "results.json").read_text())
  for key in (
    "map_tie_aware",
    "distinct_codes",
    "distinct_fraction",
    "bit_entropy",
    "unseen_map",
    "unseen_map_tie_aware",
    "unseen_map_itq",
    "unseen_map_float",
  ):
    assert saved[key] == res[key], key
  # k = 100 is left out: the 32-image database would be found whole whatever the codes.
  assert set(saved["neighbour_recall_at"]) == {"10"}
  # A random order finds 10/32 = 0.31 of the 10 true neighbours; these codes 0.52-0.55.
  assert res["neighbour_recall_at"][10] >= 0.45, res["neighbour_recall_at"]
  assert res["unseen_num_database"] == len(s.unseen_db) and res["unseen_num_query"] == len(
    s.unseen_q
  )
  assert 1 <= res["distinct_codes"] <= res["num_database"] == len(s.train_idx)
  assert 0.0 <= res["bit_entropy"] <= 1.0 and len(res["bit_entropy_per_bit"]) == 16
  # The held-out classes have two classes' worth of images: chance mAP is about 0.5.
  # The generated classes are colours the float features and their ITQ codes separate
  # (1.0 here); the hash codes, trained on the other classes, reach 0.67 (frozen) and 1.0.
  assert res["unseen_map_float"] >= 0.99 and res["unseen_map_itq"] >= 0.9, res
  assert res["unseen_map"] >= 0.6, res["unseen_map"]
