"""User-facing errors: shown as one line by the CLI (no traceback)."""


class UserError(ValueError):
  """Bad input (config, data, checkpoint, weights); the message names the fix."""


def is_user_error(e: BaseException) -> bool:
  from fszjax import config, sharding

  if isinstance(e, (UserError, config.ConfigError, sharding.ShardingError, FileNotFoundError)):
    return True
  # Other modules may define their own error types; they subclass UserError or set this flag.
  return bool(getattr(e, "user_error", False))
