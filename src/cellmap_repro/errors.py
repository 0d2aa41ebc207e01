"""The one exception type the CLI turns into a single error line."""


class ReproError(Exception):
    """A problem the user can fix: bad input, missing file, wrong setting.

    The CLI prints ``cellmap-repro: error: <message>`` and exits non-zero, without
    a traceback, so the message must name the problem and the file it concerns.
    """
