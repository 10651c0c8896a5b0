"""The one exception type jaxedit raises for bad input; the CLI prints it as a one-line error."""


class JaxeditError(Exception):
    """A user-facing error: bad input, a missing file, an unsupported checkpoint."""
