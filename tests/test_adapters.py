"""Adapters on every kind of federation: they see images only, never labels, and refuse clearly
where they cannot apply."""

from __future__ import annotations

import pytest
import torch
from conftest import toy_builder, toy_config, toy_data, toy_train

from fedbench.adapter import AdaptContext, Adapter, predict_batched
from fedbench.data import UnlabeledImages
from fedbench.engine.registry import load_registry
from fedbench.errors import FedbenchError
from fedbench.task import Task

CPU = torch.device("cpu")
REGISTRY = load_registry()
ADAPTERS = ["none", "bn-adapt", "tent", "ensemble", "iopfl-routing"]
METHODS = ["fedavg", "fedbn", "iopfl", "local", "central", "fedprox"]


@pytest.fixture(scope="module")
def federations():
    data = toy_data()
    held_out, training = data.sites[0], data.sites[1:]
    trained = {
        name: toy_train(data, training, REGISTRY.get("methods", name), toy_config(1), 0, CPU)
        for name in METHODS
    }
    return data, held_out, trained


def adapter(name: str) -> Adapter:
    params = {"epochs": 1} if name in ("tent", "iopfl-routing") else {}
    return REGISTRY.get("adapters", name)(params)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ADAPTERS)
def test_every_adapter_predicts_from_images_alone(federations, method, name):
    data, site, trained = federations
    method_cls = REGISTRY.get("methods", method)
    chosen = adapter(name)
    if chosen.needs_global_model and not method_cls.has_global_model:
        with pytest.raises(FedbenchError, match="needs a global model"):
            chosen.check(method_cls, toy_builder(data)(), data.task)
        return
    images = UnlabeledImages(site.all_samples().inputs)
    ctx = AdaptContext(batch_size=4, seed=0, task=data.task)
    outputs = chosen.predict(trained[method], images, ctx)
    assert outputs.shape == (len(images), 2, *images.inputs.shape[2:])
    assert torch.isfinite(outputs).all()


def test_none_is_the_global_model_and_ensemble_the_mean_of_softmax_maps(federations):
    data, site, trained = federations
    federation, images = trained["iopfl"], UnlabeledImages(site.all_samples().inputs)
    ctx = AdaptContext(batch_size=4, seed=0, task=data.task)
    plain = predict_batched(federation.model(federation.global_state), images.inputs, 4)
    assert torch.equal(adapter("none").predict(federation, images, ctx), plain)
    states = [federation.global_state, *federation.personalized]
    maps = [predict_batched(federation.model(s), images.inputs, 4).softmax(1) for s in states]
    mean = torch.stack(maps).mean(0)
    torch.testing.assert_close(adapter("ensemble").predict(federation, images, ctx), mean)


def test_adapters_leave_the_federation_untouched(federations):
    _, site, trained = federations
    federation = trained["iopfl"]
    before = {k: v.clone() for k, v in federation.global_state.items()}
    ctx = AdaptContext(batch_size=4, seed=0, task=toy_data().task)
    for name in ("tent", "iopfl-routing", "bn-adapt"):
        adapter(name).predict(federation, UnlabeledImages(site.all_samples().inputs), ctx)
    for key, value in federation.global_state.items():
        assert torch.equal(value, before[key]), key


class TabularTask(Task):
    """A task without dense predictions, to check that segmentation-only adapters refuse."""

    dense_prediction = False


@pytest.mark.parametrize("name", ["tent", "iopfl-routing"])
def test_segmentation_only_adapters_refuse_other_tasks(name):
    model = toy_builder(toy_data())()
    with pytest.raises(FedbenchError, match="segmentation tasks only"):
        adapter(name).check(REGISTRY.get("methods", "fedavg"), model, TabularTask())


@pytest.mark.parametrize("name", ["bn-adapt", "tent", "iopfl-routing"])
def test_norm_adapters_refuse_models_without_normalization(name):
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3))
    with pytest.raises(FedbenchError, match="needs normalization layers"):
        adapter(name).check(REGISTRY.get("methods", "fedavg"), model, toy_data().task)
