"""IOP-FL inside personalization (Jiang et al., IEEE TMI 2023): FedAvg training, and each client
keeps an exponential moving average of its locally trained models,
    tau_i <- alpha * tau_i + (1 - alpha) * w_i     after every round's local update,
with tau_i = w_i after the first round. tau_i is the client's personalized model and is never sent
to the server. Unseen sites use the `iopfl-routing` adapter (plugins/iopfl_routing.py)."""

from fedbench.hookspecs import hookimpl
from fedbench.method import Method, State, clone_state
from fedbench.tuning import Range


class IOPFL(Method):
    """FedAvg plus a private per-client EMA of local models (alpha = 0.1 as released)."""

    name = "iopfl"
    description = "IOP-FL: FedAvg + per-client EMA of local models; unseen sites route experts"
    default_adapter = "iopfl-routing"
    defaults = {"alpha": 0.1}
    #: the EMA decay, around the released 0.1 (0: the latest local model alone)
    search_space = {"method.alpha": Range(0.0, 0.9)}

    def __init__(self, params: dict, num_clients: int) -> None:
        super().__init__(params, num_clients)
        #: client side: this client's EMA tau_i (None before its first local update)
        self.trajectory: State | None = None

    def after_local_update(self, client: int, state: State) -> None:
        """Fold the fresh local model into the client's EMA (a true copy, never a reference)."""
        alpha = float(self.params["alpha"])
        tau = self.trajectory
        if tau is None:
            self.trajectory = clone_state(state)
            return
        for key, local in state.items():
            if key.endswith("num_batches_tracked"):
                tau[key] = local.clone()
            else:
                tau[key].mul_(alpha).add_(local, alpha=1.0 - alpha)

    def state_dict(self) -> dict:
        return {"trajectory": self.trajectory}

    def load_state_dict(self, state: dict) -> None:
        self.trajectory = state["trajectory"]

    def personalized_state(self, client: int, state: State) -> State:
        return state if self.trajectory is None else self.trajectory


@hookimpl
def fedbench_methods() -> list[type]:
    return [IOPFL]
