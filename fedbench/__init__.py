"""fedbench: a plugin-based benchmark suite for personalized federated medical segmentation.

The modules at this level are the public plugin API: what a method, adapter, dataset, model or
observer plugin imports. The engine, results, backends and command line are sub-packages below
and are not for plugins. Names load on first use, so `import fedbench` stays instant (no torch).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> the module of the public API that defines it
_PUBLIC = {
    "hookimpl": "fedbench.hookspecs",
    "hookspec": "fedbench.hookspecs",
    "Method": "fedbench.method",
    "ServerOptimizer": "fedbench.method",
    "trainable_keys": "fedbench.method",
    "ClientUpdate": "fedbench.method",
    "State": "fedbench.method",
    "weighted_mean": "fedbench.method",
    "clone_state": "fedbench.method",
    "state_nbytes": "fedbench.method",
    "require_plain_sgd": "fedbench.method",
    "Adapter": "fedbench.adapter",
    "AdaptContext": "fedbench.adapter",
    "TrainedFederation": "fedbench.adapter",
    "predict_batched": "fedbench.adapter",
    "Dataset": "fedbench.data",
    "FederatedData": "fedbench.data",
    "Site": "fedbench.data",
    "Split": "fedbench.data",
    "UnlabeledImages": "fedbench.data",
    "split_cases": "fedbench.data",
    "read_file": "fedbench.images",
    "read_image_and_mask": "fedbench.images",
    "UnreadableImage": "fedbench.images",
    "online_batches": "fedbench.adapter",
    "affine_parameters": "fedbench.models",
    "Task": "fedbench.task",
    "SegmentationTask": "fedbench.task",
    "predicted_labels": "fedbench.task",
    "Model": "fedbench.models",
    "normalization_modules": "fedbench.models",
    "normalization_state_keys": "fedbench.models",
    "use_batch_statistics": "fedbench.models",
    "output_layer": "fedbench.models",
    "output_layer_keys": "fedbench.models",
    "output_layer_input": "fedbench.models",
    "running_batch_norms": "fedbench.models",
    "pixel_entropy": "fedbench.models",
    "LocalContext": "fedbench.method",
    "segmentation_scores": "fedbench.metrics",
    "region_scores": "fedbench.metrics",
    "Range": "fedbench.tuning",
    "Choice": "fedbench.tuning",
    "FedbenchError": "fedbench.errors",
    "Diverged": "fedbench.errors",
    "write_atomic": "fedbench.storage",
    "stable_hash": "fedbench.storage",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    """Import a public name from its module the first time it is asked for (PEP 562)."""
    if name not in _PUBLIC:
        raise AttributeError(f"module 'fedbench' has no attribute '{name}'")
    return getattr(importlib.import_module(_PUBLIC[name]), name)
