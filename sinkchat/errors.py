"""The one exception users see: its message is printed as a single line, never a traceback."""


class SinkchatError(Exception):
    """Bad input or an unusable model/file; the CLI prints ``sinkchat: error: <message>`` and exits 2."""
