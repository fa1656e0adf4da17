"""fedbench: a plugin-based benchmark suite for personalized federated medical segmentation."""

__version__ = "0.1.0"
