"""Errors that mean "the user asked for something that cannot work".

The command line turns a `UserError` into a one-line message and exit code 2,
before anything is written to the workdir.
"""


class UserError(Exception):
  """Bad input: unknown config key, wrong type, missing data, mismatched checkpoint."""


def closest_match(name, candidates):
  """The candidate closest to `name`, or None; used for 'did you mean' hints."""
  import difflib
  matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
  return matches[0] if matches else None
