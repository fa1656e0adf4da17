"""FedAvg (McMahan et al., 2017): every parameter and buffer is averaged, weighted by samples."""

from fedbench.hookspecs import hookimpl
from fedbench.method import Method


class FedAvg(Method):
    """The engine's base Method already is FedAvg; this names it as a plugin."""

    name = "fedavg"
    description = "FedAvg: sample-weighted mean of all parameters and buffers"


@hookimpl
def fedbench_methods() -> list[type]:
    return [FedAvg]
