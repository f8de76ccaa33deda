"""Errors in what the user gave (a config value, a path, a file, a setup), as opposed to bugs.

Every check of user input raises one of these. Each subclasses the built-in exception a
caller would expect (`InvalidInput` is a ValueError, `NotFound` a FileNotFoundError, ...),
so `except ValueError` keeps working, while the command line (`rshash_jax.main`) prints
them as one line, `rshash: error: <message>`, and exits 2; any other exception is a bug
and keeps its traceback (exit 1). `--traceback` or RSHASH_TRACEBACK=1 shows the trace of
these too.
"""


class UserError(Exception):
  """Base class: the message names the file, field or value at fault and what to do."""


class InvalidInput(UserError, ValueError):
  """A config value, argument or file content that cannot be used."""


class WrongType(UserError, TypeError):
  """An argument of the wrong dtype or kind."""


class NotFound(UserError, FileNotFoundError):
  """A file, dataset, encoder or weights that is not where the user said."""


class AlreadyExists(UserError, FileExistsError):
  """An output path that exists (nothing is ever overwritten)."""


class Unreachable(UserError, ConnectionError):
  """A coordinator or peer process that cannot be reached."""


class Timeout(UserError, TimeoutError):
  """Processes that did not meet within the configured time."""


class Diverged(UserError, FloatingPointError):
  """Training produced a non-finite loss (a setting, not a bug: lower the learning rate)."""


EXIT_CODE = 2  # the exit status of an error in the input (bugs exit 1)
