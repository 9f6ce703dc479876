"""Per-layer size and compute report of a loaded model (``wsdeploy inspect``)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch

from wsdeploy.errors import UnsupportedLayerError
from wsdeploy.modelfile import LoadedModel
from wsdeploy.models import count_model


def inspect_model(loaded: LoadedModel) -> dict[str, Any]:
    """Counts of every parametrised layer and the model totals, as a JSON-able dict.

    Raises:
        UnsupportedLayerError: the model is a bare exported graph, whose WSNet layers are no
            longer modules to count.
    """
    if loaded.kind == "pt2":
        raise UnsupportedLayerError(
            "inspect counts WSNet layers of a checkpoint or module; "
            f"{loaded.source} is a torch.export graph"
        )
    counts = count_model(loaded.module, torch.zeros(loaded.input_shape))
    layers = []
    for c in counts.layers:
        row = asdict(c)
        row["compression"] = c.compression
        row["speedup"] = c.speedup
        layers.append(row)
    return {
        "model": loaded.source,
        "arch": loaded.arch,
        "config": loaded.config,
        "metrics": loaded.metrics,
        "input_shape": list(loaded.input_shape),
        "layers": layers,
        "totals": {
            "params": counts.params,
            "dense_params": counts.dense_params,
            "compression": counts.dense_params / counts.params,
            "dense_macs": counts.dense_macs,
            "shared_macs": counts.shared_macs,
            "speedup": counts.dense_macs / counts.shared_macs,
        },
    }
