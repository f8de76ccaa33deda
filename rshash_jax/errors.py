"""Errors in what the user gave (a config value, a path, a file, a setup), as opposed to bugs.

Every check of user input raises one of these. Each subclasses the built-in exception a
caller would expect (`InvalidInput` is a ValueError, `NotFound` a FileNotFoundError, ...),
so `except ValueError` keeps working, while the command line (`rshash_jax.main`) prints
them as one line, `rshash: error: <message>`, and exits 2; any other exception is a bug
and keeps its traceback (exit 1). `--traceback` or RSHASH_TRACEBACK=1 shows the trace of
these too.
"""

import errno as _errno
import os as _os


class UserError(Exception):
  """Base class: the message names the file, field or value at fault and what to do."""


class InvalidInput(UserError, ValueError):
  """A config value, argument or file content that cannot be used."""


class TooLarge(InvalidInput):
  """A file or value that asks for more than a stated limit (pixels, bits, batch, k, bytes);
  the message names the limit and how to raise it. The service answers it 413."""


class NotAnImage(InvalidInput):
  """Bytes or a file that no decoder reads as an image (corrupt, truncated, another format).
  The service answers it 415."""


class Incompatible(InvalidInput):
  """A readable image this encoder cannot take as it is (16-bit or float pixels, a band
  count other than the encoder's, bands it cannot choose). The service answers it 422."""


class Corrupt(InvalidInput):
  """Stored state (a checkpoint step, a cache, a chunk, an encoder, a codes file) whose
  contents fail their checksum or cannot be parsed; the message names the file or step."""


class Storage(UserError, OSError):
  """The disk is full, read-only or refuses a write: nothing partial was committed, and the
  same command resumes once there is room (the message names the path and the errno)."""


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


# Write failures of the storage, not of the program: the disk is full, over quota, read-only,
# refuses permission, or the file passed a size limit (RLIMIT_FSIZE).
STORAGE_ERRNOS = {
  _errno.ENOSPC: "no space left on the device",
  _errno.EDQUOT: "disk quota exceeded",
  _errno.EROFS: "read-only file system",
  _errno.EACCES: "permission denied",
  _errno.EPERM: "operation not permitted",
  _errno.EFBIG: "file too large for this file system or limit",
}


def storage_error(e: BaseException):
  """A `Storage` error for `e` when it, or an exception it was raised from (orbax and
  TensorStore wrap the OSError of a failed write), is a storage failure; else None."""
  seen = 0
  while e is not None and seen < 16:
    if isinstance(e, Storage):
      return e
    if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS:
      where = e.filename or "the output"
      return Storage(
        f"cannot write {where}: {STORAGE_ERRNOS[e.errno]} (errno {_errno.errorcode[e.errno]}). "
        "Nothing partial was kept; free space or fix the permissions and run the same "
        "command again to resume"
      )
    text = str(e)
    for code, words in STORAGE_ERRNOS.items():  # TensorStore reports errno in its text only
      if code in (_errno.ENOSPC, _errno.EDQUOT, _errno.EROFS, _errno.EFBIG) and (
        _os.strerror(code).lower() in text.lower() or _errno.errorcode[code] in text
      ):
        return Storage(
          f"cannot write: {STORAGE_ERRNOS[code]} ({text.splitlines()[0][:200]}). Nothing "
          "partial was kept; free space and run the same command again to resume"
        )
    e = e.__cause__ or e.__context__
    seen += 1
  return None


EXIT_CODE = 2  # the exit status of an error in the input (bugs exit 1)
