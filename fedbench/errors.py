"""Errors that reach the user as one clear line instead of a traceback."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


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


def one_line(text: str) -> str:
    """`text` with each unprintable character (newline, carriage return, tab, escape codes)
    written as Python writes it in a repr (a newline as the two characters \\n): a value or
    a file name holding one can then never split a one-line message, or act on the terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def exit_text(exc: SystemExit) -> str:
    """What a plugin's sys.exit did, for the one line that reports it: 'called sys.exit(3)'."""
    code = "" if exc.code is None else repr(exc.code)
    return f"called sys.exit({code})"


@contextmanager
def blamed_on(plugin: str) -> Iterator[None]:
    """Turn an unexpected exception raised inside a plugin's code into a PluginFailure that
    names the plugin (`plugin` reads e.g. "method 'fedavg' failed in training")."""
    try:
        yield
    except (Diverged, FedbenchError, PluginFailure, KeyboardInterrupt):  # already named
        raise
    except SystemExit as exc:  # a plugin that exits is that plugin's failure, not the run's end
        raise PluginFailure(f"{plugin}: it called sys.exit({exc.code!r})") from None
    except Exception as exc:
        raise PluginFailure(f"{plugin}: {type(exc).__name__}: {exc}") from exc
