"""The optimiser's learning-rate schedule, on a tiny network fitted by a real Lightning Trainer."""

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mlops.train.training import Classifier


def rates_over_fit(schedule: str, optimizer: str = "adamw") -> list[float]:
    """The learning rate at every training batch of a 3-epoch fit of 4 batches each."""
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,)))
    module = Classifier(nn.Linear(4, 2), optimizer, 0.01, 0.0, schedule)
    seen: list[float] = []

    class Watch(pl.Callback):
        def on_train_batch_start(self, trainer, *_):
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[Watch()])
    trainer.fit(module, DataLoader(data, batch_size=8))
    return seen


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_cosine_falls_every_batch_from_the_configured_rate_towards_zero(optimizer):
    rates = rates_over_fit("cosine", optimizer)
    assert len(rates) == 12 and rates[0] == pytest.approx(0.01)
    assert all(later < earlier for earlier, later in zip(rates, rates[1:]))
    assert rates[-1] < 0.01 * 0.05  # the last batch moves the weights by a few per cent of the rate


def test_constant_keeps_the_configured_rate():
    assert rates_over_fit("constant") == [pytest.approx(0.01)] * 12
