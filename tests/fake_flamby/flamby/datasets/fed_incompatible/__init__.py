"""A dataset written for another version of a library: a name it imports no longer exists (as
FLamby's fed_ixi imports monai.transforms.AddChannel, which MONAI removed)."""

from torch.nn import LayerThatThisTorchDoesNotHave  # noqa: F401
