"""Errors that reach the user as one clear line instead of a traceback."""


class FedbenchError(Exception):
    """Bad input or an unusable environment: the CLI prints the message and exits non-zero."""


class Diverged(Exception):
    """A loss became NaN or inf: the run is recorded as `diverged`, never as a score."""


def unknown_name(kind: str, name: str, known: list[str]) -> FedbenchError:
    """The standard error for a name nobody registered, listing the names that exist."""
    return FedbenchError(f"unknown {kind} '{name}'; known: {', '.join(sorted(known)) or 'none'}")


class PluginFailure(Exception):
    """A plugin raised during training, aggregation or adaptation: the run is recorded as failed
    with the plugin's name and error, and a grid goes on."""
