"""The one exception a user can cause. Its message names the fix; the CLI prints it on one line."""


class LayerpruneError(Exception):
    """Bad input: a missing file, an unsupported architecture, a mask of the wrong length, ..."""
