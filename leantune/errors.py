"""The one error type for mistakes a user can cause (config keys, files, paths, shapes).

The CLI prints such an error as a single sentence and exits with status 2; every layer raises it
instead of letting a raw KeyError/OSError/traceback reach the user.
"""


class LeantuneError(ValueError):
    """A problem with the user's input, described in one sentence that names the culprit."""
