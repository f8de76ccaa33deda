"""Test setup: 8 fake CPU devices (set before JAX initialises), quiet TF, shared fixtures."""

import atexit
import logging
import os
import pathlib
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
# A compilation cache for this session only (fresh directory, removed at exit): the many
# tiny trainings compile the same programs again (each run, each resume, each CLI child
# that inherits the environment). MrHash's resume test: 70 s -> 45 s. Results are
# unaffected: a hit is the same executable. The multi-process tests drop JAX_* variables.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="rshash_jax_test_cache_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
UCMERCED = REPO.parent / "shared" / "data" / "ucmerced"


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
  """(root, workdir, data): a tiny DHCNN trained on generated class folders, with its
  encoder in workdir/encoder (shared by the tools and serving tests)."""
  import sys  # pylint: disable=g-import-not-at-top

  sys.path.insert(0, str(REPO / "configs"))
  import dhcnn as dhcnn_config  # pylint: disable=g-import-not-at-top
  from rshash_jax.training import train_dhcnn  # pylint: disable=g-import-not-at-top

  root = tmp_path_factory.mktemp("tools")
  c = dhcnn_config.get_config("tiny")
  c.data.generated_per_class = 10
  res = train_dhcnn.train_and_evaluate(c, str(root / "w"))
  data = os.path.dirname(os.path.dirname(res["dataset_description"].split(" in ", 1)[1] + "/x/y"))
  return root, str(root / "w"), data


CHROMIUM = os.environ.get("RSHASH_CHROMIUM", "/usr/bin/chromium")


@pytest.fixture
def serve_in_thread():
  """start(app) -> URL: an ASGI app served by uvicorn on a free 127.0.0.1 port in a thread;
  every server started is stopped after the test."""
  import socket  # pylint: disable=g-import-not-at-top
  import threading  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top

  import uvicorn  # pylint: disable=g-import-not-at-top

  started = []

  def start(app):
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      port = s.getsockname()[1]
    server = uvicorn.Server(
      uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        limit_concurrency=32,
        timeout_keep_alive=2,
      )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    started.append((server, thread))
    deadline = time.monotonic() + 30
    while not server.started:
      assert time.monotonic() < deadline and thread.is_alive(), "the server did not start in 30 s"
      time.sleep(0.05)
    return f"http://127.0.0.1:{port}"

  yield start
  for server, thread in started:
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def chromium():
  """A context manager giving a headless Debian chromium driven by Playwright (skipped
  without the browser; failed instead when RSHASH_REQUIRE_BROWSER is set, as in CI)."""
  import contextlib  # pylint: disable=g-import-not-at-top

  if not os.path.exists(CHROMIUM):
    if os.environ.get("RSHASH_REQUIRE_BROWSER"):
      pytest.fail(
        f"no browser at {CHROMIUM} (RSHASH_REQUIRE_BROWSER is set: .ci/run installs chromium)"
      )
    pytest.skip(f"no browser at {CHROMIUM} (apt-get install chromium)")
  from playwright.sync_api import sync_playwright  # pylint: disable=g-import-not-at-top

  @contextlib.contextmanager
  def launch():
    with sync_playwright() as p:
      browser = p.chromium.launch(
        executable_path=CHROMIUM,
        headless=True,
        timeout=60_000,
        args=[  # the flags this machine's closed network needs (no background fetches)
          "--no-sandbox",
          "--disable-gpu",
          "--disable-quic",
          "--no-first-run",
          "--disable-background-networking",
          "--disable-component-update",
          "--disable-sync",
        ],
      )
      try:
        yield browser
      finally:
        browser.close()

  return launch


@pytest.fixture
def ucmerced_dir():
  if not UCMERCED.is_dir():
    pytest.skip(f"real data not found at {UCMERCED}")
  return UCMERCED


class _LostAsyncErrors(logging.Handler):
  """asyncio reports a task or future whose exception nobody retrieved through its logger
  ("Task exception was never retrieved"), not as an exception: collect those."""

  def __init__(self):
    super().__init__(logging.ERROR)
    self.messages = []

  def emit(self, record):
    self.messages.append(record.getMessage())


@pytest.fixture(autouse=True)
def no_lost_async_errors():
  """A test fails when it leaves an asyncio error behind (orbax runs its I/O on asyncio: a
  refused or failed checkpoint operation must be finished, not abandoned)."""
  handler = _LostAsyncErrors()
  log = logging.getLogger("asyncio")
  log.addHandler(handler)
  try:
    yield
  finally:
    log.removeHandler(handler)
  assert not handler.messages, f"asyncio errors left behind: {handler.messages}"
