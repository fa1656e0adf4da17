"""The Flower bridge (issue 27): any fedbench method on Flower, simulated (`fedbench flower
run`) or deployed (`fedbench flower new` writes the app). Needs the `flower` extra; nothing in
fedbench imports this package but its own command, which calls `require_flower` first."""

from __future__ import annotations

from fedbench.errors import FedbenchError

#: the Flower release the bridge is written and tested for (the `flower` extra pins it)
FLOWER_VERSION = "1.42.0"


def require_flower() -> None:
    """One line when Flower is missing or another release than the bridge's."""
    try:
        import flwr
    except ImportError:
        raise FedbenchError("the Flower bridge needs flwr: pip install fedbench[flower]") from None
    if flwr.__version__ != FLOWER_VERSION:
        raise FedbenchError(
            f"the Flower bridge is written for flwr {FLOWER_VERSION}, this is "
            f"{flwr.__version__}: pip install fedbench[flower]"
        )
