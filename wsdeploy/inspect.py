"""Per-layer size and compute report of a loaded model (``wsdeploy inspect``)."""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

import torch

from wsdeploy.modelfile import LoadedModel
from wsdeploy.models import count_model
from wsdeploy.passes.recognize import layer_names


def inspect_model(loaded: LoadedModel) -> dict[str, Any]:
    """Counts of every parametrised layer and the model totals, as a JSON-able dict, and
    what the torch stage recognised in it (``recognition``: one record per convolution and
    linear layer, hand-written WSNet layers included).

    A wsdeploy checkpoint (a zoo architecture) is counted module by module; any other model
    (a ``.pt2`` program, a user's module) from its lowering: its WSNet layers, hand-written
    ones included, and its other convolution/linear layers.
    """
    from wsdeploy import compiler

    recognition: list[Any] = []
    _, ws_layers = compiler.lower(loaded, "auto", recognition=recognition)
    if loaded.kind != "checkpoint":
        layers = _program_rows(ws_layers, recognition)
        other = _stored_values(loaded.module) - sum(r.pop("reads") for r in layers)
        if other > 0:  # norms, recurrent layers, embeddings, the WSNet layers' biases
            layers.append(
                {
                    "name": "other parameters",
                    "kind": "-",
                    "in_shape": [],
                    "out_shape": [],
                    "phi_shape": [],
                    "params": other,
                    "dense_params": other,
                    "dense_macs": 0,
                    "shared_macs": 0,
                    "compression": 1.0,
                    "speedup": None,
                }
            )
    else:
        counts = count_model(loaded.module, torch.zeros(loaded.input_shape))
        layers = []
        for c in counts.layers:
            row = asdict(c)
            row["compression"] = c.compression
            row["speedup"] = c.speedup
            layers.append(row)
    params = sum(r["params"] for r in layers)
    dense_params = sum(r["dense_params"] for r in layers)
    dense_macs = sum(r["dense_macs"] for r in layers)
    shared_macs = sum(r["shared_macs"] for r in layers)
    return {
        "model": loaded.source,
        "arch": loaded.arch,
        "config": loaded.config,
        "metrics": loaded.metrics,
        "input_shape": list(loaded.input_shape),
        "input_shapes": [list(shape) for shape in loaded.input_shapes],
        "layers": layers,
        "recognition": [r.to_dict() for r in recognition],
        "totals": {
            "params": params,
            "dense_params": dense_params,
            "compression": dense_params / params if params else None,
            "dense_macs": dense_macs,
            "shared_macs": shared_macs,
            "speedup": dense_macs / shared_macs if shared_macs else None,
        },
    }


def _program_rows(ws_layers: list[dict], recognition: list) -> list[dict[str, Any]]:
    """Rows of a program without modules: its WSNet layers (as lowered) and the layers the
    torch stage found dense (a layer whose weight is computed some other way has no row:
    its record in ``recognition`` says why)."""
    rows = []
    # a recognised layer's row by its recognition line's name ("ws1 (conv2d_1)"), not the
    # ONNX node's ("node_conv2d_1", from a later trace: maybe another layer's name)
    layer_names(ws_layers, recognition)
    counted: set[str] = set()  # the program nodes whose phi is counted: one phi, one count
    for r in ws_layers:
        params = int(math.prod(r["phi_shape"]))
        source = r.get("source_node", r["node"])
        if source in counted:  # the layer again (its phi, and its dense twin's weight, once)
            rows.append({**_row(r, 0), "dense_params": 0, "reads": 0})
            continue
        counted.add(source)
        rows.append({**_row(r, params), "reads": params})  # of ``_stored_values``
    for rec in recognition:
        d = rec.detail
        if rec.status == "tied" and "dense_macs" in d:
            # tied: phi holds the values it reads; params count what it stores (index
            # and sign planes too) in 4-byte units, so totals compare bytes honestly
            rows.append(
                {
                    "name": rec.node,
                    "kind": f"tied {rec.layer}",
                    "in_shape": d.get("input_shape", []),
                    "out_shape": d.get("output_shape", []),
                    "phi_shape": [d["values"]],
                    "params": -(-d["stored_bytes"] // 4),
                    "dense_params": d["params"],
                    "dense_macs": d["dense_macs"],
                    "shared_macs": d["dense_macs"],
                    "compression": d["dense_bytes"] / d["stored_bytes"],
                    "speedup": 1.0,
                    "reads": d["values"],
                }
            )
            continue
        if rec.status not in ("dense", "not recognised") or "params" not in d:
            continue
        # a weight computed at every run from what the file stores: those values count
        stored = d["params"]
        if d.get("stored") == "computed":
            stored = -(-d["computed_from_bytes"] // 4)
        rows.append(
            {
                "name": rec.node,
                "kind": rec.layer if rec.status == "dense" else f"{rec.layer} (computed)",
                "in_shape": d.get("input_shape", []),
                "out_shape": d.get("output_shape", []),
                "phi_shape": [],
                "params": stored,
                "dense_params": d["params"],
                "dense_macs": d["dense_macs"],
                "shared_macs": d["dense_macs"],
                "compression": d["params"] / stored,
                "speedup": 1.0,
                # the stored tensors it is computed from, whatever the build keeps
                "reads": -(-d.get("computed_from_bytes", 4 * stored) // 4),
            }
        )
    return rows


def _row(r: dict[str, Any], params: int) -> dict[str, Any]:
    """A WSNet layer's row (``passes.record``'s record ``r``), storing ``params`` values."""
    return {
        "name": r.get("name", r["node"]),
        "kind": r["op"],
        "in_shape": r["input_shape"],
        "out_shape": r["output_shape"],
        "phi_shape": r["phi_shape"],
        "params": params,
        "dense_params": r["dense_params"],
        "dense_macs": r["dense_macs"],
        "shared_macs": r["shared_macs"],
        "compression": r["dense_params"] / params if params else None,
        "speedup": r["dense_macs"] / r["shared_macs"] if r["shared_macs"] else None,
    }


def _stored_values(module: torch.nn.Module) -> int:
    """The model's stored float values: parameters and float buffers (batch norm's running
    statistics are in the file too)."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() for t in tensors if t.is_floating_point())
