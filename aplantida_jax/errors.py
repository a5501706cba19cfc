"""Errors a user fixes by changing an input, not the code.

`python -m aplantida_jax.main` prints a StageError as one line (`error: <stage>: <message>`)
and exits 1, without a traceback; any other exception is a bug and keeps its traceback.
"""


class StageError(Exception):
  """A stage stopped on bad input or a bad run; the message names the input and the fix."""


class DivergedError(StageError):
  """The training loss became NaN/inf; nothing after the last finite step was saved."""
