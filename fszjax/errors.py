"""User-facing errors: the CLI shows them as one line (no traceback); anything else is a bug
and keeps its traceback."""


class UserError(ValueError):
  """Bad input (config, data, checkpoint, weights); the message names the fix.

  Every user-facing error of fszjax subclasses this class (`ConfigError`, `ShardingError`,
  `DataError`, ...); there is no other way of marking one."""


def is_user_error(e: BaseException) -> bool:
  """True for errors the CLI prints as one line: a `UserError` or a missing file."""
  return isinstance(e, (UserError, FileNotFoundError))
