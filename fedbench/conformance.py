"""The conformance kit: what every plugin, built-in or third-party, must satisfy. Run it as
`fedbench plugin check NAME`, or from a test: `assert check_plugin("my-method") == []`.

Checks, each reported as one line when it fails: the plugin passed the door (loaded without a
warning); a quick run ends ok; the same seed gives the same record; a federation resumed from a
checkpoint equals the uninterrupted one; the server receives no image or mask tensor, and no
client image or mask is left in a class attribute or module global (the server's instance of
a method never sees a client's); a local update leaves the global state it was handed as it
was; the bytes counted up and down match what was sent; an adapter's output does not depend on
the labels. Runs use the quick preset on `synth-prostate` (a dataset plugin: its own data), or
the dataset given, two rounds, with one site held out whenever the loaded data has three or
more, so the outside regime and the adapters are checked on any dataset."""

from __future__ import annotations

import copy
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedbench.errors import FedbenchError
from fedbench.leaks import carries_data, image_statistics, raw_images, undeclared

if TYPE_CHECKING:
    from fedbench.engine.registry import Registry
    from fedbench.engine.resolve import Run, RunSpec

KINDS = ("methods", "adapters", "datasets", "models")
ROUNDS = 2


@dataclass(frozen=True)
class Subject:
    """The plugin under check: its kind, name, and the run spec that exercises it."""

    kind: str
    name: str
    spec: RunSpec


def find_kind(registry: Registry, name: str) -> str:
    """The kind `name` is registered as, or one clear error."""
    kinds = [k for k in KINDS if name in registry.components[k]]
    if not kinds:
        known = sorted({n for k in KINDS for n in registry.names(k)})
        raise FedbenchError(f"no plugin named '{name}'; known: {', '.join(known)}")
    return kinds[0]


def subject_for(
    registry: Registry,
    kind: str,
    name: str,
    results_dir: Path,
    overrides: list[str] | None = None,
    dataset: str | None = None,
) -> Subject:
    """A small run that uses the plugin: a method on synth-prostate with its default adapter
    (one held-out site); an adapter on FedAvg (or local when it needs no global model); a
    dataset with FedAvg; a model chosen by model.name."""
    from fedbench.engine.resolve import RunSpec

    spec = RunSpec(
        method="fedavg",
        preset="quick",
        rounds=ROUNDS,
        results_dir=results_dir,
        overrides=list(overrides or []),
        workers=1,  # the checks watch training in this process
    )
    if dataset is not None:
        spec = replace(spec, dataset=dataset)
    if kind == "methods":
        spec = replace(spec, method=name)
    elif kind == "adapters":
        adapter = registry.get("adapters", name)
        spec = replace(
            spec, adapter=name, method="fedavg" if adapter.needs_global_model else "local"
        )
    elif kind == "datasets":
        spec = replace(spec, dataset=name)
    else:
        spec = replace(spec, overrides=[*spec.overrides, f"model.name={name}"])
    sites = loaded_sites(replace(spec, holdout="none"), registry)
    return Subject(kind, name, replace(spec, holdout=sites[-1] if len(sites) > 2 else "none"))


def loaded_sites(spec: RunSpec, registry: Registry) -> list[str]:
    """The site names of the data the spec loads (whatever configured it: defaults, or a
    `--set data.path`), so the outside regime and adapters are checked on any dataset."""
    from fedbench.engine.resolve import resolve

    run = resolve(spec, registry)
    data = run.dataset.load(run.config["data"], spec.seed, Path(spec.results_dir) / "cache")
    return [site.name for site in data.sites]


def door_problems(registry: Registry, kind: str, name: str) -> list[str]:
    """Load warnings about the plugin (module or file) that provides `name`."""
    source = registry.sources[kind][name]
    return [f"door: {line}" for line in registry.failures if line.startswith(f"plugin '{source}'")]


def computed(spec: RunSpec, registry: Registry, results_dir: Path) -> dict[str, Any]:
    """The record of `spec` computed in a fresh results folder (nothing cached)."""
    from fedbench.engine.reporter import Reporter
    from fedbench.engine.resolve import resolve
    from fedbench.engine.run import compute

    run = resolve(replace(spec, results_dir=results_dir), registry)
    return compute(run, registry, Reporter()).record


#: cost entries read from the clock, which no two runs share
CLOCK_KEYS = ("train_s", "adapt_s")


def counted(cost: Any) -> Any:
    """A record's cost without its clock readings: what the same seed must reproduce."""
    if isinstance(cost, dict):
        return {k: counted(v) for k, v in cost.items() if k not in CLOCK_KEYS}
    return cost


def run_problems(subject: Subject, registry: Registry, scratch: Path) -> list[str]:
    """A quick run ends ok, and the same seed gives the same metrics and cost."""
    try:
        first = computed(subject.spec, registry, scratch / "a")
    except FedbenchError as exc:
        return [f"run: the quick run cannot start: {exc}"]
    if first["status"] != "ok":
        return [f"run: a quick run ended {first['status']}: {first.get('error', '')}"]
    second = computed(subject.spec, registry, scratch / "b")
    same = first["metrics"] == second["metrics"] and counted(first["cost"]) == counted(
        second["cost"]
    )
    return [] if same else ["determinism: two runs with the same seed gave different records"]


def spy_class(method: type) -> tuple[type, list[dict[str, Any]]]:
    """A subclass of `method` that records what the server sends and receives each round: the
    payloads it sent each client, the global state and the updates it aggregated; and whether
    a client's local update changed the global state it was handed."""
    rounds: list[dict[str, Any]] = [{"payloads": [], "previous": None, "updates": []}]

    class Spy(method):  # type: ignore[misc, valid-type]
        name = method.name
        changed_global = False

        def local_update(self, model: Any, ctx: Any) -> Any:
            import torch

            given = {k: v.clone() for k, v in ctx.global_state.items()}
            sent = super().local_update(model, ctx)
            same = all(torch.equal(given[k], ctx.global_state[k]) for k in given)
            Spy.changed_global = Spy.changed_global or not same
            return sent

        def server_payload(self, client: int) -> Any:
            payload = super().server_payload(client)
            rounds[-1]["payloads"].append(payload)
            return payload

        def server_update(self, previous: Any, updates: Any) -> Any:
            rounds[-1].update(previous=previous, updates=list(updates))
            rounds.append({"payloads": [], "previous": None, "updates": []})
            return super().server_update(previous, updates)

    return Spy, rounds


def nbytes(state: dict[str, Any]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def server_problems(run: Run, data: Any, rounds: list[dict[str, Any]], cost: dict) -> list[str]:
    """Only model-shaped tensors reach the server, and the bytes match what was sent."""
    problems: list[str] = []
    model_state = run.build_model(data.task).state_dict()
    model_shapes = {tuple(v.shape) for v in model_state.values()}
    sample_shapes = {tuple(s.train.inputs.shape[1:]) for s in data.sites}
    sample_shapes |= {tuple(s.train.targets.shape[1:]) for s in data.sites}
    declared = run.method.shares_data
    statistics, raw = image_statistics(data), raw_images(data)
    up = down = 0
    for entry in rounds:
        for update in entry["updates"]:
            extras = {k: v for k, v in update.extras.items() if k not in declared}
            sent = {**update.state, **{f"extra:{k}": v for k, v in extras.items()}}
            if any(carries_data(t, model_shapes, sample_shapes) for t in sent.values()):
                problems.append("privacy: a client sent an image- or mask-shaped tensor")
            problems += undeclared(extras, statistics, "a client sent")
            mine = {k: v for k, v in update.extras.items() if k in declared}  # shape-checked above
            problems += undeclared(mine, raw, "a client sent", "never allowed")
            up += nbytes(update.state) + nbytes(update.extras)
        for payload in entry["payloads"]:
            kept = {k: v for k, v in payload.items() if k not in {*declared, *model_state}}
            problems += undeclared(kept, statistics, "the server sent")
            problems += undeclared(payload, raw, "the server sent", "never allowed")
        down += sum(nbytes(payload) for payload in entry["payloads"])
        if entry["previous"] is not None:
            down += len(entry["updates"]) * nbytes(entry["previous"])
    if run.method.pooled:
        return problems
    updates = [u for entry in rounds for u in entry["updates"]]
    if run.method.has_global_model and updates:  # unshared keys, sent once for unseen sites
        own = {k: v for k, v in model_state.items() if k not in updates[0].state}
        up += len({u.client for u in updates}) * nbytes(own)
    if (cost["bytes_up"], cost["bytes_down"]) != (up, down):
        problems.append(
            f"bytes: counted {cost['bytes_up']} up / {cost['bytes_down']} down, but the "
            f"updates and payloads hold {up} / {down}"
        )
    return sorted(set(problems))


def training_problems(subject: Subject, registry: Registry, scratch: Path) -> list[str]:
    """For a method: server-side checks and resume equality on the federation of all sites."""
    from fedbench.engine.resolve import resolve
    from fedbench.engine.training import train_federation

    run = resolve(replace(subject.spec, results_dir=scratch), registry)
    data = run.dataset.load(run.config["data"], run.spec.seed, scratch / "cache")
    spy, rounds = spy_class(run.method)

    def train(config: dict[str, Any], method: type, **kwargs: Any) -> Any:
        build = lambda: run.build_model(data.task)  # noqa: E731
        return train_federation(data, data.sites, method, build, config, 0, run.device, **kwargs)

    whole = train(run.config, spy)
    problems = server_problems(run, data, rounds, whole.cost)
    if spy.changed_global:
        problems.append("boundary: local_update changed ctx.global_state in place")
    problems += channel_problems(run.method, data)
    first = copy.deepcopy(run.config)
    first["train"]["rounds"] = 1
    checkpoint = scratch / "resume.pt"
    train(first, run.method, checkpoint_path=checkpoint)
    resumed = train(run.config, run.method, checkpoint_path=checkpoint)
    if not same_federation(whole, resumed):
        problems.append("resume: a federation resumed from its checkpoint differs")
    return problems


def channel_problems(method: type, data: Any) -> list[str]:
    """Client images or masks left where every instance can read them (class attributes,
    module globals): a channel to the server outside the counted messages. Attributes of an
    instance need no scan: the server's instance never sees a client's."""
    splits = [split for site in data.sites for split in (site.train, site.val)]
    samples = {row_bytes(t) for split in splits for t in (*split.inputs, *split.targets)}
    shapes = {tuple(t.shape[1:]) for split in splits for t in (split.inputs, split.targets)}
    bases = [c for c in method.__mro__ if c.__module__ not in ("fedbench.method", "builtins")]
    places = [(f"class {c.__name__}", vars(c)) for c in bases]
    places.append((f"module {method.__module__}", vars(sys.modules[method.__module__])))
    for where, names in places:
        for value in tensors_in(list(names.values())):
            for shape in shapes:
                if tuple(value.shape[value.dim() - len(shape) :]) != shape:
                    continue
                rows = value.detach().cpu().reshape(-1, *shape)
                if any(row_bytes(row) in samples for row in rows):
                    return [f"privacy: client data found in the {where}, outside the messages"]
    return []


def row_bytes(tensor: Any) -> bytes:
    """One sample's bytes, to look it up among the clients' samples."""
    return bytes(tensor.detach().cpu().contiguous().numpy().tobytes())


def tensors_in(values: list[Any], depth: int = 3) -> list[Any]:
    """The tensors among `values`, looking into lists, tuples and dicts `depth` levels deep."""
    import torch

    found = [v for v in values if isinstance(v, torch.Tensor)]
    if depth:
        inner = [x for v in values if isinstance(v, list | tuple) for x in v]
        inner += [x for v in values if isinstance(v, dict) for x in v.values()]
        found += tensors_in(inner, depth - 1) if inner else []
    return found


def same_federation(a: Any, b: Any) -> bool:
    """Bit-equal global and personalized states."""
    import torch

    states = [(a.global_state or {}, b.global_state or {})]
    states += list(zip(a.personalized, b.personalized, strict=True))
    return all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in states)


def label_problems(subject: Subject, registry: Registry, scratch: Path) -> list[str]:
    """For an adapter: its outputs do not change when the unseen site's labels are shuffled."""
    import torch

    from fedbench.adapter import AdaptContext
    from fedbench.data import UnlabeledImages
    from fedbench.engine.federations import load_or_train
    from fedbench.engine.resolve import resolve

    run = resolve(replace(subject.spec, results_dir=scratch), registry)
    data = run.dataset.load(run.config["data"], run.spec.seed, scratch / "cache")
    holdout = data.sites[-1].name
    federation = load_or_train(run, data, holdout, lambda *_: None)
    site = data.site(holdout)
    every = site.all_samples()
    ctx = AdaptContext(run.config["train"]["batch_size"], run.spec.seed, data.task)
    outputs = []
    for _ in range(2):
        assert run.adapter is not None
        adapter = run.adapter(run.config["adapter"])
        outputs.append(adapter.predict(federation, UnlabeledImages(every.inputs), ctx))
        splits = [site.train, site.val, site.test, *([site.unseen] if site.unseen else [])]
        for split in splits:  # every label the process holds, shuffled in place
            split.targets.copy_(split.targets[torch.randperm(len(split))])
    same = torch.equal(outputs[0], outputs[1])
    return [] if same else ["labels: the adapter's outputs change when the labels do"]


def check_plugin(
    name: str,
    registry: Registry | None = None,
    overrides: list[str] | None = None,
    dataset: str | None = None,
) -> list[str]:
    """Every conformance check for the plugin `name` (`overrides`: `--set` assignments, such as
    a dataset's data.path; `dataset`: the runs' dataset, synth-prostate unless the plugin is a
    dataset); the problems found, one line each (empty when it conforms)."""
    from fedbench.engine.registry import load_registry

    registry = registry or load_registry()
    kind = find_kind(registry, name)
    problems = door_problems(registry, kind, name)
    with tempfile.TemporaryDirectory(prefix="fedbench-check-") as tmp:
        scratch = Path(tmp)
        try:
            subject = subject_for(registry, kind, name, scratch, overrides, dataset)
        except FedbenchError as exc:  # the settings or the data refused before any run
            return [*problems, f"run: the quick run cannot start: {exc}"]
        problems += run_problems(subject, registry, scratch / "runs")
        if problems:
            return problems
        if subject.kind == "methods":
            problems += training_problems(subject, registry, scratch / "train")
        if subject.kind == "adapters":
            problems += label_problems(subject, registry, scratch / "adapt")
    return problems
