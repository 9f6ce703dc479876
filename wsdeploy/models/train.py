"""Deterministic training of zoo models on the offline synthetic datasets.

The same seed, configuration and thread count give the same checkpoint. Accuracy is measured
on the held-out ``test`` split, which is generated from a different seed than ``train``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from . import data, zoo

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]
"""progress(done, total, message): called after every training step."""


def dataset_for(
    arch: zoo.Arch, config: dict[str, Any], split: str, n: int, seed: int = 0
) -> data.Dataset:
    """The split of the zoo dataset that a model of ``arch`` with ``config`` consumes."""
    if arch.dataset == "audio":
        return data.make_dataset("audio", split, n, seed=seed, length=config["input_length"])
    return data.make_dataset("image", split, n, seed=seed, size=config["image_size"])


@torch.no_grad()
def evaluate(model: nn.Module, ds: data.Dataset, batch_size: int = 64) -> float:
    """Top-1 accuracy of ``model`` (put in eval mode) on ``ds``."""
    model.eval()
    correct = 0
    for i in range(0, len(ds.y), batch_size):
        logits = model(torch.from_numpy(ds.x[i : i + batch_size]))
        correct += int((logits.argmax(-1).numpy() == ds.y[i : i + batch_size]).sum())
    return correct / len(ds.y)


@dataclass(frozen=True)
class TrainResult:
    model: nn.Module
    config: dict[str, Any]
    metrics: dict[str, Any]


def train(
    name: str,
    *,
    seed: int = 0,
    epochs: int | None = None,
    n_train: int | None = None,
    progress: Progress | None = None,
    **config_overrides: Any,
) -> TrainResult:
    """Train zoo architecture ``name`` from scratch with Adam and a cosine schedule.

    Args:
        name: zoo architecture name.
        seed: seeds the weights, the data order and the datasets.
        epochs, n_train: override the architecture's training recipe (tests use small ones).
        progress: optional callback for a progress bar.
        **config_overrides: architecture config keys (e.g. ``spec="S8C8D1"``).
    """
    arch = zoo.get_arch(name)
    config = arch.config(**config_overrides)
    recipe = dict(arch.train)
    epochs = epochs or recipe["epochs"]
    n_train = n_train or recipe["n_train"]
    torch.manual_seed(seed)
    model = arch.build(config)
    train_ds = dataset_for(arch, config, "train", n_train, seed)
    test_ds = dataset_for(arch, config, "test", recipe["n_test"], seed)
    bs = recipe["batch_size"]
    steps_per_epoch = (n_train + bs - 1) // bs
    total = epochs * steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe["lr"], total_steps=total)
    rng = np.random.default_rng(seed)
    loss_fn = nn.CrossEntropyLoss()
    step = 0
    for epoch in range(epochs):
        model.train()
        order = rng.permutation(n_train)
        for i in range(0, n_train, bs):
            idx = order[i : i + bs]
            x = torch.from_numpy(train_ds.x[idx])
            y = torch.from_numpy(train_ds.y[idx])
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if progress:
                progress(step, total, f"epoch {epoch + 1}/{epochs} loss {loss.item():.3f}")
        log.info("epoch %d loss %.4f", epoch + 1, loss.item())
    acc = evaluate(model, test_ds)
    metrics = {
        "test_accuracy": acc,
        "n_test": len(test_ds.y),
        "n_train": n_train,
        "epochs": epochs,
        "seed": seed,
        "dataset": f"synthetic-{arch.dataset}",
    }
    return TrainResult(model.eval(), config, metrics)
