"""Errors of the data layer: one line that names the fix (the CLI shows them without traceback)."""

from fszjax.errors import UserError


class DataError(UserError):
  """A data problem with a one-line message naming the fix."""


class DataNotPreparedError(DataError):
  """The dataset is not prepared in data_dir; the message names the prepare command."""


class FeatureKeyError(DataError, KeyError):
  """A configured feature key is not in the dataset; the message lists the available keys."""

  def __str__(self):  # KeyError would quote the message
    return str(self.args[0])
