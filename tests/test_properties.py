"""Property-based tests (hypothesis) of what reads user input: the run-record reader, the `--set`
parser, the `--seeds` parser and the `--holdout` parser. Each either gives back what was meant or
raises FedbenchError, never another exception. Every test is derandomized (the same examples on
every machine and every run) with an explicit example count and no deadline (no wall clock)."""

from __future__ import annotations

import contextlib
import json
import string
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_leaderboard import INSIDE, make_record

from fedbench.backends.grid import MAX_SEEDS, parse_seeds
from fedbench.engine.config import (
    MAX_SEED,
    apply_overrides,
    parse_assignment,
    preset_config,
    validate,
)
from fedbench.engine.resolve import holdout_sites
from fedbench.errors import FedbenchError
from fedbench.results.leaderboard import build_leaderboard
from fedbench.results.record import read_records


def fixed(examples: int) -> settings:
    """Reproducible settings: derandomized, no example database, no deadline."""
    return settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@pytest.fixture(scope="module")
def shelf(tmp_path_factory) -> Path:
    """A folder for the results folders the examples write (one fresh one per example)."""
    return tmp_path_factory.mktemp("examples")


def results_with(shelf: Path, name: str, content: bytes) -> Path:
    """A fresh results folder whose runs/ holds one file."""
    results = Path(tempfile.mkdtemp(dir=shelf))
    (results / "runs").mkdir()
    (results / "runs" / name).write_bytes(content)
    return results


def read_one(results: Path, name: str) -> tuple[list[dict], list[str]]:
    """read_records, checking the contract: one record, or one one-line warning naming the file."""
    records, warnings = read_records(results)
    assert len(records) + len(warnings) == 1
    for line in warnings:
        assert name in line and "\n" not in line
    return records, warnings


# the record reader


@fixed(100)
@given(value=JSON)
def test_any_json_value_is_a_record_or_one_warning(shelf, value):
    read_one(results_with(shelf, "r.json", json.dumps(value).encode()), "r.json")


@fixed(100)
@given(content=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_any_bytes_are_a_record_or_one_warning(shelf, content):
    read_one(results_with(shelf, "r.json", content), "r.json")


def record_with_rows(seed: int) -> dict:
    return make_record("mutant", "alpha", seed, {"x": 0.3, "y": 0.4})


@st.composite
def mutated(draw) -> tuple[dict, list[Any]]:
    """A valid record with one place in it replaced by any JSON value, or deleted; and the
    path of that place."""
    record = record_with_rows(draw(st.integers(0, 3)))
    path: list[Any] = []
    node: Any = record
    while isinstance(node, dict | list) and node and draw(st.booleans()):
        key = draw(st.sampled_from(sorted(node) if isinstance(node, dict) else range(len(node))))
        if not isinstance(node[key], dict | list) or draw(st.booleans()):
            path.append(key)
            break
        path.append(key)
        node = node[key]
    if not path:
        return draw(JSON), path
    parent = record
    for key in path[:-1]:
        parent = parent[key]
    if isinstance(parent, dict) and draw(st.booleans()):
        del parent[path[-1]]
    else:
        parent[path[-1]] = draw(JSON)
    return record, path


@pytest.fixture(scope="module")
def board_records() -> list[dict]:
    return [
        make_record(f"{method}-s{seed}", method, seed, inside)
        for method, seeds in INSIDE.items()
        for seed, inside in seeds.items()
    ]


@fixed(100)
@given(case=mutated())
def test_a_mutated_record_is_named_and_skipped_or_boards_cleanly(shelf, board_records, case):
    """A mutation the schema refuses names the mutated field; one it lets through never breaks
    the board (it builds, or says why not in a FedbenchError)."""
    record, path = case
    content = json.dumps(record, allow_nan=True).encode()
    records, warnings = read_one(results_with(shelf, "mutant.json", content), "mutant.json")
    if warnings:
        if path:
            assert str(path[0]) in warnings[0]
        return
    with contextlib.suppress(FedbenchError):
        build_leaderboard([*board_records, *records])


SAFE = st.text(string.ascii_letters + string.digits + "-_.", min_size=1, max_size=12)
ROW = st.fixed_dictionaries(
    {
        "regime": st.sampled_from(["inside", "outside"]),
        "site": SAFE,
        "metric": SAFE,
        "value": st.floats(),
        "selection": st.sampled_from(["final", "val-best"]),
    }
).map(lambda row: {**row, "holdout": row["site"] if row["regime"] == "outside" else None})
VALID = st.fixed_dictionaries(
    {
        "schema_version": st.just(1),
        "run_id": SAFE,
        "status": st.sampled_from(["ok", "failed", "diverged"]),
        "method": SAFE,
        "adapter": SAFE,
        "dataset": SAFE,
        "seed": st.integers(0, MAX_SEED),
        "config": st.dictionaries(SAFE, JSON, max_size=3),
        "config_hash": SAFE,
        "environment": st.dictionaries(SAFE, JSON, max_size=3),
        "started_at": st.datetimes().map(lambda d: d.isoformat(timespec="seconds")),
        "finished_at": st.datetimes().map(lambda d: d.isoformat()),
        "wall_s": st.floats(0, 1e9),
        "cost": st.fixed_dictionaries(
            {
                "bytes_up": st.integers(0),
                "bytes_down": st.integers(0),
                "client_steps": st.integers(0),
            }
        ),
        "metrics": st.lists(ROW, max_size=5),
    },
    optional={"error": st.text(max_size=30), "holdouts": st.lists(SAFE, max_size=3)},
)


def inside_only(record: dict) -> dict:
    """The same record had the outside regime not run: adapter null, no outside rows."""
    rows = [row for row in record["metrics"] if row["regime"] == "inside"]
    return {**record, "adapter": None, "metrics": rows}


@fixed(60)
@given(record=VALID | VALID.map(inside_only))
def test_a_valid_record_round_trips(shelf, record):
    text = json.dumps(record, allow_nan=True)
    records, warnings = read_one(results_with(shelf, "ok.json", text.encode()), "ok.json")
    assert warnings == []
    assert json.dumps(records[0], allow_nan=True) == text


# --set KEY=VALUE

PART = st.text(string.ascii_lowercase + string.digits + "_", min_size=1, max_size=8)


@fixed(200)
@given(parts=st.lists(PART, min_size=1, max_size=4), value=st.text(max_size=20))
def test_set_parse_of_a_formatted_assignment_gives_it_back(parts, value):
    assert parse_assignment(f"{'.'.join(parts)}={value}") == (parts, value.strip())


@fixed(200)
@given(text=st.text(max_size=30) | st.from_regex(r"[a-z.= ]{0,12}", fullmatch=True))
def test_set_parse_of_any_text_is_a_key_path_or_one_error(text):
    try:
        path, value = parse_assignment(text)
    except FedbenchError as exc:
        assert "\n" not in str(exc) or "\n" in text
        return
    assert "=" in text and all(path) and value == value.strip()


QUICK_KEYS = sorted(
    f"{section}.{key}" for section, values in preset_config("quick").items() for key in values
)


@fixed(150)
@given(
    assignments=st.lists(
        st.tuples(st.sampled_from(QUICK_KEYS) | PART, st.text(max_size=12)).map("=".join),
        max_size=3,
    )
)
def test_any_set_on_a_known_config_validates_or_is_one_error(assignments):
    with contextlib.suppress(FedbenchError):
        validate(apply_overrides(preset_config("quick"), assignments))


@fixed(100)
@given(rounds=st.integers(1, 10**6), lr=st.floats(1e-9, 10.0), amsgrad=st.booleans())
def test_set_values_are_read_back_as_typed(rounds, lr, amsgrad):
    sets = [f"train.rounds={rounds}", f"train.lr={lr!r}", f"train.amsgrad={str(amsgrad).lower()}"]
    train = apply_overrides(preset_config("quick"), sets)["train"]
    assert (train["rounds"], train["lr"], train["amsgrad"]) == (rounds, lr, amsgrad)


# --seeds

SEED = st.integers(0, MAX_SEED)


@fixed(200)
@given(seeds=st.lists(SEED, min_size=1, max_size=20))
def test_seeds_parse_of_a_listed_set_gives_it_back(seeds):
    assert parse_seeds(",".join(map(str, seeds))) == sorted(set(seeds))


@fixed(150)
@given(low=SEED, span=st.integers(0, MAX_SEEDS - 1), extra=st.lists(SEED, max_size=3))
def test_seeds_parse_of_a_range_gives_every_seed_in_it(low, span, extra):
    high = min(low + span, MAX_SEED)
    text = ",".join([f"{low}-{high}", *map(str, extra)])
    wanted = sorted(set(range(low, high + 1)) | set(extra))
    if len(wanted) > MAX_SEEDS:
        with pytest.raises(FedbenchError, match="more than"):
            parse_seeds(text)
    else:
        assert parse_seeds(text) == wanted


@fixed(300)
@given(text=st.text(max_size=24) | st.from_regex(r"[0-9,\- ]{0,24}", fullmatch=True))
def test_seeds_parse_of_any_text_is_bounded_seeds_or_one_error(text):
    try:
        seeds = parse_seeds(text)
    except FedbenchError:
        return
    assert seeds == sorted(set(seeds)) and 1 <= len(seeds) <= MAX_SEEDS
    assert all(0 <= s <= MAX_SEED for s in seeds)


# --holdout

#: site names; a leading digit keeps them apart from the words all and none
SITES = st.lists(
    st.builds("{}{}".format, st.integers(0, 9), SAFE), min_size=3, max_size=6, unique=True
)


@fixed(150)
@given(data=st.data(), sites=SITES)
def test_holdout_parse_of_listed_sites_gives_them_back(data, sites):
    order = data.draw(st.permutations(sites))
    chosen = order[: data.draw(st.integers(1, len(sites)))]
    assert holdout_sites(",".join(chosen), sites) == chosen
    assert holdout_sites(" , ".join(chosen), None) == chosen
    assert holdout_sites("all", sites) == sites and holdout_sites("none", sites) == []


@fixed(100)
@given(data=st.data(), sites=SITES)
def test_holdout_with_a_repeated_site_never_holds_it_out_twice(data, sites):
    chosen = data.draw(st.lists(st.sampled_from(sites), min_size=2))
    repeated = [*chosen, chosen[0]]
    try:
        held = holdout_sites(",".join(repeated), sites)
    except FedbenchError:
        return  # refusing the repetition is as good as holding each site out once
    assert held == list(dict.fromkeys(repeated))


@fixed(200)
@given(
    text=st.text(max_size=20) | st.from_regex(r"[a-c, ]{0,10}", fullmatch=True), known=st.booleans()
)
def test_holdout_parse_of_any_text_is_known_sites_or_one_error(text, known):
    sites = ["a", "b", "c"]
    try:
        held = holdout_sites(text, sites if known else None)
    except FedbenchError:
        return
    if held is None:
        assert text == "all" and not known
        return
    assert len(held) == len(set(held))
    assert all(site in sites for site in held) or not known
