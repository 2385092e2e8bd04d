"""The one training schedule every model of the study gets.

AdamW (learning rate 1e-3, weight decay 5e-4), cosine decay to zero over all steps, batch 32,
cross-entropy, no augmentation (the study is about what a model does with few images, and
augmentation would hide over-fitting). The batch order comes from a generator seeded with the
run's seed, so the three models of one seed see the same batches in the same order.

Training loss and accuracy per epoch are the means over that epoch's batches in training mode
(what Keras' ``fit`` history reports); validation loss and accuracy are measured in eval mode
after each epoch. As a diagnostic, each epoch also records the validation accuracy of the same
weights with the BatchNorm running statistics recomputed over the training images
(``val_acc_bn_recomputed``): where it is far above the eval-mode accuracy, the running
statistics, not the weights, are what fails (they lag weights that change fast).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

BATCH_SIZE = 32
EVAL_BATCH_SIZE = 256
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 5e-4


@dataclass
class History:
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    train_acc: list[float] = field(default_factory=list)
    val_acc: list[float] = field(default_factory=list)
    val_acc_bn_recomputed: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, list[float]]:
        return {
            "train_loss": self.train_loss,
            "val_loss": self.val_loss,
            "train_acc": self.train_acc,
            "val_acc": self.val_acc,
            "val_acc_bn_recomputed": self.val_acc_bn_recomputed,
        }


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy in eval mode (the model's mode is restored)."""
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    try:
        for start in range(0, len(y), EVAL_BATCH_SIZE):
            xb, yb = x[start : start + EVAL_BATCH_SIZE], y[start : start + EVAL_BATCH_SIZE]
            logits = model(xb)
            total_loss += F.cross_entropy(logits, yb, reduction="sum").item()
            correct += (logits.argmax(1) == yb).sum().item()
    finally:
        model.train(was_training)
    return total_loss / len(y), correct / len(y)


@torch.no_grad()
def accuracy_with_recomputed_bn(
    model: nn.Module, x_train: torch.Tensor, val: tuple[torch.Tensor, torch.Tensor]
) -> float:
    """Validation accuracy of a copy of ``model`` whose BatchNorm running statistics are
    recomputed as the plain average over the training images in batches (``model`` itself
    is not changed). A model without BatchNorm gets its eval-mode accuracy."""
    probe = copy.deepcopy(model).eval()
    norms = [m for m in probe.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the batches below
        norm.train()
    if norms:
        for start in range(0, len(x_train), EVAL_BATCH_SIZE):
            probe(x_train[start : start + EVAL_BATCH_SIZE])
    return evaluate(probe, *val)[1]


def train_model(
    model: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    *,
    epochs: int,
    seed: int,
    desc: str = "",
) -> History:
    """Train ``model`` in place on tensors already on its device; return the per-epoch history."""
    x, y = train
    steps_per_epoch = -(-len(y) // BATCH_SIZE)
    optimiser = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=epochs * steps_per_epoch)
    order_gen = torch.Generator().manual_seed(seed)
    history = History()
    start = time.perf_counter()
    bar = tqdm(total=epochs * steps_per_epoch, desc=desc, unit="batch", leave=False, disable=None)
    try:
        for _ in range(epochs):
            model.train()
            order = torch.randperm(len(y), generator=order_gen).to(y.device)
            loss_sum = torch.zeros((), device=y.device)
            correct = torch.zeros((), device=y.device, dtype=torch.long)
            for i in range(steps_per_epoch):
                idx = order[i * BATCH_SIZE : (i + 1) * BATCH_SIZE]
                logits = model(x[idx])
                loss = F.cross_entropy(logits, y[idx])
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                schedule.step()
                loss_sum += loss.detach() * len(idx)
                correct += (logits.detach().argmax(1) == y[idx]).sum()
                bar.update()
            history.train_loss.append(loss_sum.item() / len(y))
            history.train_acc.append(correct.item() / len(y))
            val_loss, val_acc = evaluate(model, *val)
            history.val_loss.append(val_loss)
            history.val_acc.append(val_acc)
            history.val_acc_bn_recomputed.append(accuracy_with_recomputed_bn(model, x, val))
            bar.set_postfix(train_acc=f"{history.train_acc[-1]:.2f}", val_acc=f"{val_acc:.2f}")
            if bar.disable:  # no progress bar (not a terminal): one line per epoch instead
                print(f"  {desc} epoch {len(history.val_acc)}/{epochs}: train acc "
                      f"{history.train_acc[-1]:.3f}, val acc {val_acc:.3f} "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)
    finally:
        bar.close()
    model.eval()
    history.seconds = time.perf_counter() - start
    return history
