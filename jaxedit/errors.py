"""The one exception type jaxedit raises for bad input; the CLI prints it as a one-line error."""


class JaxeditError(Exception):
    """A user-facing error: bad input, a missing file, an unsupported checkpoint."""


def json_problem(e) -> str:
    """What a :class:`json.JSONDecodeError` says, with the column it points at (its ``msg`` alone can end
    mid-sentence: "Unterminated string starting at")."""
    return f"{e.msg}{'' if e.msg.endswith(' at') else ' at'} column {e.colno}"
