"""WSNet layers, the model zoo, training and the bundled checkpoints (``wsdeploy.models``)."""

from __future__ import annotations

from .layers import (
    WS_LAYERS,
    LayerCount,
    ModelCount,
    WSConv1d,
    WSConv2d,
    WSLinear,
    count_model,
    dense_baseline,
)
from .sampling import WSSpec

__all__ = [
    "WS_LAYERS",
    "LayerCount",
    "ModelCount",
    "WSConv1d",
    "WSConv2d",
    "WSLinear",
    "WSSpec",
    "count_model",
    "dense_baseline",
]
