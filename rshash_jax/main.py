r"""rshash_jax command line: train and evaluate a deep hashing model.

  python -m rshash_jax.main --config=configs/dhcnn.py:local --workdir=/tmp/dhcnn
  python -m rshash_jax.main --config=configs/dhcnn.py --config.model.bits=32 --workdir=DIR
  python -m rshash_jax.main --config=configs/mrhash.py:local --workdir=/tmp/mrhash

--config takes an ml_collections config file, optionally `file.py:PRESETS` (see the
file's docstring), and `--config.FIELD=VALUE` overrides any field. Re-running the same
command resumes from the checkpoints in --workdir. Results: WORKDIR/results.json,
pr_curve.png, precision_at_k.png, TensorBoard logs in WORKDIR.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (file.py or file.py:presets).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietOrbax:
  """Drops orbax's per-save INFO chatter (dozens of lines per checkpoint); keeps warnings."""

  def filter(self, record):
    return record.levelno >= 30 or "orbax" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.get_absl_handler().addFilter(_QuietOrbax())
  import jax  # pylint: disable=g-import-not-at-top
  from rshash_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  input_pipeline.configure_tf()
  if os.environ.get("RSHASH_DISTRIBUTED"):  # multi-host TPU/GPU: one process per host
    jax.distributed.initialize()
  logging.info("JAX devices: %d (%s), processes: %d", jax.device_count(), jax.devices()[0].platform,
               jax.process_count())
  config = FLAGS.config
  if config.method == "dhcnn":
    from rshash_jax import train  # pylint: disable=g-import-not-at-top
    results = train.train_and_evaluate(config, FLAGS.workdir)
  elif config.method == "mrhash":
    from rshash_jax import train_mrhash  # pylint: disable=g-import-not-at-top
    results = train_mrhash.train_and_evaluate(config, FLAGS.workdir)
  else:
    raise ValueError(f"config.method={config.method!r} is not a known method (dhcnn, mrhash)")
  if results:
    from rshash_jax import evaluation  # pylint: disable=g-import-not-at-top
    print(evaluation.summary_line(results))
    print(f"results: {os.path.join(FLAGS.workdir, 'results.json')}")


def run():
  """Console-script entry point (`rshash`)."""
  app.run(main)


if __name__ == "__main__":
  sys.exit(run())
