"""Fair tuning (`fedbench tune`): every method searched with the same number of trials and the
same training budget, on validation data only.

A trial trains the federation of every site (no site held out) with settings sampled from the
method's declared space (fedbench.tuning) and the shared client learning rate; its objective is
the mean over sites of the personalized models' validation Dice at the final round. Test splits
are never read. Optuna's TPE sampler (seeded) picks the settings; its median pruner stops a
trial whose per-round validation figure falls below the median of earlier trials at that round.
The study lives in an SQLite database under RESULTS/tuning, so a killed tuning resumes: trials
that finished are kept, the one that was running is run again with the same settings."""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fedbench.engine import cache
from fedbench.engine.federations import claimed, data_fingerprint, load_or_train
from fedbench.engine.registry import Registry
from fedbench.engine.resolve import RunSpec, resolve
from fedbench.errors import Diverged, FedbenchError
from fedbench.storage import stable_hash
from fedbench.tuning import TRAIN_SPACE, Choice, Range, Space, checked_space, full_space

#: what a trial's value is, as a tuned study and its records say
OBJECTIVE = "mean validation dice over sites, personalized models, final round, no site held out"
#: bumped when the objective or the trial's run changes, so an old study is not resumed
OBJECTIVE_VERSION = 1
#: user attributes: a trial that a killed or interrupted tuning did not finish (it does not count),
#: and, on the trial queued in its place, the number of the one it runs again
INTERRUPTED, RERUN_OF = "interrupted", "rerun_of"


class Pruned(FedbenchError):
    """Raised from a round's callback when the pruner stops the trial (a FedbenchError, so the
    engine passes it through instead of blaming the method)."""


@dataclass(frozen=True)
class Tuned:
    """The outcome of tuning one method: its best settings and what finding them cost."""

    method: str
    study: str
    settings: dict[str, Any]
    value: float
    trials: int
    pruned: int
    failed: int
    #: CPU seconds of every trial, interrupted ones included (all threads of this process)
    cpu_s: float
    seed: int
    space: dict[str, str] = field(default_factory=dict)
    objective: str = OBJECTIVE
    #: an adapter's tuning is one per real unseen site, which it never reads
    holdout: str | None = None

    def provenance(self) -> dict[str, Any]:
        """What a record of a run with these settings says of where they came from."""
        return {
            "tuned": self.method,
            "trials": self.trials,
            "objective": self.objective,
            "value": round(self.value, 6),
            "seed": self.seed,
            "study": self.study,
        }


def method_space(method_cls: type) -> Space:
    """The settings a tuning of this method samples: the shared ones, then its own."""
    return full_space(checked_space(method_cls, "method"), TRAIN_SPACE)


def check_fixed(space: Space, overrides: list[str]) -> None:
    """A setting fixed with --set cannot also be searched: one line instead of a --set that
    the sampled value would silently replace."""
    fixed = {text.partition("=")[0].strip() for text in overrides}
    both = sorted(fixed & set(space))
    if both:
        raise FedbenchError(f"--set {both[0]} fixes a setting the tuning searches; drop it")


def described(space: Space) -> dict[str, str]:
    """A space as text (for the study's name and the tuned study file)."""
    out = {}
    for key, value in space.items():
        if isinstance(value, Range):
            scale = "log" if value.log else ("int" if value.integer else "uniform")
            out[key] = f"{scale} [{value.low:g}, {value.high:g}]"
        else:
            out[key] = "one of " + ", ".join(map(str, value.values))
    return out


def study_name(spec: RunSpec, space: Space, code: dict[str, str], device: str) -> str:
    """The name of a tuning's Optuna study: the method, and a hash of everything that makes two
    tunings comparable (data, preset, rounds, seed, fixed settings, space, objective, the
    plugins' code and the device): edited code starts a new study."""
    key = [
        code,
        device,  # the one a run resolves to: "auto" here is "cpu" on a Ray worker
        spec.method,
        spec.dataset,
        spec.preset,
        spec.rounds,
        spec.seed,
        sorted(spec.overrides),
        described(space),
        OBJECTIVE_VERSION,
    ]
    return f"{spec.method}-{spec.dataset}-{stable_hash(key)[:10]}"


def suggested(trial: Any, space: Space) -> dict[str, Any]:
    """One value per setting of `space`, drawn by the trial."""
    values: dict[str, Any] = {}
    for key, dim in space.items():
        if isinstance(dim, Choice):
            values[key] = trial.suggest_categorical(key, list(dim.values))
        elif dim.integer:
            values[key] = trial.suggest_int(key, int(dim.low), int(dim.high), log=dim.log)
        else:
            values[key] = trial.suggest_float(key, dim.low, dim.high, log=dim.log)
    return values


def as_overrides(settings: dict[str, Any]) -> list[str]:
    """Settings as `--set` assignments (floats in full precision)."""
    from fedbench.backends.study import setting_text

    return [
        f"{key}={repr(value) if isinstance(value, float) else setting_text(value)}"
        for key, value in settings.items()
    ]


def validation_score(
    spec: RunSpec, registry: Registry, on_round: Callable[[int, float], None]
) -> float:
    """Train the federation of every site under `spec` and return the mean over sites of its
    final-round validation Dice; `on_round(round, that round's mean)` hears each round."""
    run = resolve(spec, registry)
    results_dir = Path(spec.results_dir)
    data = run.dataset.load(run.config["data"], spec.seed, results_dir / "cache")

    def heard(round_index: int, scores: dict[str, float], replayed: bool) -> None:
        if scores:
            on_round(round_index, statistics.mean(scores.values()))

    fingerprint = data_fingerprint(data)
    federation = load_or_train(run, data, None, heard, fingerprint)
    # a trial's federation is read once: its cache entry (fedbench's own) is not kept
    cache.cache_path(results_dir, run.federation_identity(None, fingerprint)).unlink(
        missing_ok=True
    )
    last = federation.history[-1]["val"] if federation.history else {}
    if not last:
        raise FedbenchError(f"{spec.dataset} has no validation split to tune on")
    return float(statistics.mean(last.values()))


def trial_spec(spec: RunSpec, settings: dict[str, Any]) -> RunSpec:
    """The run a trial makes: every site in the federation, validation every round, no
    checkpoints (a killed trial is run again), the tuning's own results folder."""
    overrides = [*spec.overrides, *as_overrides(settings), "eval.history=true"]
    return replace(spec, holdout="none", overrides=overrides, checkpoint_every=10**9, workers=1)


def requeue_interrupted(study: Any, storage: Any) -> None:
    """Trials a killed tuning left running (no other tuning holds the study) are marked failed
    and interrupted; every interrupted trial's settings are queued again, once."""
    from optuna.trial import TrialState

    study_id = storage.get_study_id_from_name(study.study_name)
    trials = study.get_trials(deepcopy=False)
    rerun = {t.user_attrs.get(RERUN_OF) for t in trials}
    for trial in trials:
        if trial.state == TrialState.RUNNING:
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
            storage.set_trial_user_attr(trial_id, INTERRUPTED, True)
            storage.set_trial_state_values(trial_id, TrialState.FAIL)
        elif not trial.user_attrs.get(INTERRUPTED) or trial.number in rerun:
            continue
        study.enqueue_trial(trial.params, user_attrs={RERUN_OF: trial.number})


def finished(study: Any) -> list[Any]:
    """The trials that count towards the budget: complete, pruned, or failed on their own."""
    from optuna.trial import TrialState

    done = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    return [
        t
        for t in study.get_trials(deepcopy=False, states=done)
        if not t.user_attrs.get(INTERRUPTED)
    ]


#: a trial's score: (sampled settings, report(step, value so far)) -> the value to maximize
Score = Callable[[dict[str, Any], Callable[[int, float], None]], float]


@dataclass
class Tuning:
    """One tuning, opened: its Optuna study and space, where its runs write, and its score."""

    study: Any
    storage: Any
    space: Space
    runs: RunSpec
    score: Score

    def run_trials(self, count: int, on_trial: Callable[[int], None], seed: int) -> None:
        """Run `count` more trials here, drawing with a sampler seeded by `seed`; `on_trial(done)`
        after each."""
        import optuna

        self.study.sampler = optuna.samplers.TPESampler(seed=seed)
        self.study.optimize(self.objective(on_trial), n_trials=count, catch=(Diverged,))

    def objective(self, on_trial: Callable[[int], None]) -> Callable[[Any], float]:
        """A trial's run: the sampled settings, reported round by round to the pruner."""
        import optuna

        def objective(trial: Any) -> float:
            clock = time.process_time()

            def report(round_index: int, value: float) -> None:
                trial.report(value, round_index)
                if trial.should_prune():
                    raise Pruned(f"pruned at round {round_index}")

            settings = suggested(trial, self.space)
            try:
                return self.score(settings, report)
            except Pruned:
                raise optuna.TrialPruned() from None
            except Diverged:  # the settings' own failure: it counts
                raise
            except BaseException:  # Ctrl-C, a full disk, a plugin's bug: run again on resume
                trial.set_user_attr(INTERRUPTED, True)
                raise
            finally:
                trial.set_user_attr("cpu_s", time.process_time() - clock)
                on_trial(len(finished(self.study)) + 1)

        return objective


def open_tuning(spec: RunSpec, registry: Registry) -> Tuning:
    """The study of `spec.method`'s tuning under RESULTS/tuning, made or loaded."""
    space = method_space(registry.get("methods", spec.method))
    check_fixed(space, spec.overrides)
    runs = replace(spec, results_dir=Path(spec.results_dir) / "tuning")
    run = resolve(trial_spec(runs, {}), registry)
    rounds = run.config["train"]["rounds"]

    def score(settings: dict[str, Any], report: Callable[[int, float], None]) -> float:
        return validation_score(trial_spec(runs, settings), registry, report)

    name = study_name(spec, space, run.code, run.device.type)
    return opened(runs, name, space, score, warmup=rounds // 3)


def opened(runs: RunSpec, name: str, space: Space, score: Score, warmup: int) -> Tuning:
    """The Optuna study `name` in RESULTS/tuning/optuna.db (`runs.results_dir`), made or loaded;
    its pruner waits `warmup` reported steps."""
    import optuna

    optuna.logging.set_verbosity(logging.ERROR)  # fedbench says what failed, in one line
    database = Path(runs.results_dir) / "optuna.db"
    try:
        database.parent.mkdir(parents=True, exist_ok=True)
        storage = optuna.storages.RDBStorage(
            f"sqlite:///{database}", engine_kwargs={"connect_args": {"timeout": 60}}
        )
        study = optuna.create_study(
            study_name=name,
            storage=storage,
            direction="maximize",
            pruner=optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=warmup),
            load_if_exists=True,
        )
    except Exception as exc:  # a locked, corrupt or older database; a folder it cannot write
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FedbenchError(f"cannot open the tuning database {database}: {first}") from None
    return Tuning(study, storage, space, runs, score)


@contextmanager
def held(tuning: Tuning) -> Iterator[None]:
    """This process's claim on the study: another tuning of it is refused, and since none
    can be running, trials left running by a killed one are queued again."""
    name = tuning.study.study_name
    with claimed(Path(tuning.runs.results_dir) / f"{name}.study", wait=False) as mine:
        if not mine:
            raise FedbenchError(f"another fedbench tune is running the study {name}")
        requeue_interrupted(tuning.study, tuning.storage)
        yield


def tune_method(
    spec: RunSpec, registry: Registry, trials: int, on_trial: Callable[[int, int], None]
) -> Tuned:
    """Run (or resume) the tuning of `spec.method` up to `trials` trials in all, in this
    process; `on_trial(done, trials)` after each."""
    return tune_here(open_tuning(spec, registry), spec, trials, on_trial)


def tune_here(
    tuning: Tuning,
    spec: RunSpec,
    trials: int,
    on_trial: Callable[[int, int], None],
    **what: Any,
) -> Tuned:
    """Run (or resume) `tuning` up to `trials` trials in all, in this process (`what`: see
    `summary`)."""
    with held(tuning):
        left = trials - len(finished(tuning.study))
        if left > 0:
            # a resumed search draws on: seeded by the trials it has, it repeats none of them
            seed = spec.seed + len(tuning.study.trials)
            tuning.run_trials(left, lambda done: on_trial(done, trials), seed)
    return summary(tuning.study, spec, tuning.space, trials, **what)


def summary(study: Any, spec: RunSpec, space: Space, trials: int, **what: Any) -> Tuned:
    """The best of the study's first `trials` finished trials (a study run further earlier
    answers a smaller budget with that budget's trials) and the whole tuning's cost; `what`:
    the Tuned fields that differ from a method's tuning (method, objective, holdout)."""
    from optuna.trial import TrialState

    done = sorted(finished(study), key=lambda t: t.number)[:trials]
    complete = [t for t in done if t.state == TrialState.COMPLETE]
    if not complete:
        label = what.get("method", spec.method)
        raise FedbenchError(f"no trial of {label} finished; nothing to choose from")
    best = max(complete, key=lambda t: t.value)
    every = study.get_trials(deepcopy=False)
    fields: dict[str, Any] = {"method": spec.method, **what}
    return Tuned(
        **fields,
        study=study.study_name,
        settings=dict(best.params),
        value=float(best.value),
        trials=len(done),
        pruned=sum(t.state == TrialState.PRUNED for t in done),
        failed=sum(t.state == TrialState.FAIL for t in done),
        cpu_s=sum(float(t.user_attrs.get("cpu_s", 0.0)) for t in every),
        seed=spec.seed,
        space=described(space),
    )
