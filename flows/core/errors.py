"""The one exception type a user can act on."""


class TunedeckError(Exception):
    """A failure caused by the user's input.

    Its message is one sentence that names the input at fault and what to do about it; the
    entry points print it without a traceback and exit non-zero.
    """
