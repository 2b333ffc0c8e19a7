"""The error of bad input: a file, flag or value the user gave that cannot be used.

Its message names the thing (the file and line, the config field, the flag) and the fix; the
scripts print it as one line without a traceback (`moe_jax.experiment_main`), while any other
exception keeps its traceback, since it is a bug.
"""


class InputError(ValueError):
    """A file, flag or value the user gave is unusable; the message names it and the fix."""
