"""The one exception users see: its message is printed as a single line, never a traceback."""


class SinkchatError(Exception):
    """Bad input or an unusable model/file; the CLI prints ``sinkchat: error: <message>`` and exits
    with ``exit_code`` (2: the command line or a file was refused; 1: something failed later)."""

    exit_code = 2


class LoadFailed(SinkchatError):
    """The model could not be loaded after the chat screen opened (shown there, then printed), or
    the chat screen stopped on an unexpected error."""

    exit_code = 1


class WriteFailed(SinkchatError):
    """Output could not be written (a full disk, an I/O error); what was saved stays saved."""

    exit_code = 1
