"""Train: a torchvision network, chosen by name, fitted with PyTorch Lightning."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.models import get_model

from mlops.config import BuildConfig, ModelConfig, TrainConfig
from mlops.data.ingest import Prepared
from mlops.serve.inference import ModelSpec, load_array

log = logging.getLogger(__name__)


class ImageDataset(Dataset):
    def __init__(self, files: list[tuple[Path, int]], spec: ModelSpec, hflip: bool = False):
        self.files, self.spec, self.hflip = files, spec, hflip

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.files[index]
        array = load_array(path, self.spec)
        if self.hflip and torch.rand(()) < 0.5:
            array = np.ascontiguousarray(array[:, :, ::-1])
        return torch.from_numpy(array), label


def build_network(model: ModelConfig, num_classes: int) -> nn.Module:
    """A torchvision model by registry name; optional local weights (the head may differ)."""
    network = get_model(model.name, weights=None, num_classes=num_classes)
    if model.weights_path is not None:
        state = torch.load(model.weights_path, map_location="cpu", weights_only=True)
        own = network.state_dict()
        usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        if not usable:
            raise ValueError(f"model.weights_path {model.weights_path}: no tensor fits {model.name}")
        network.load_state_dict(usable, strict=False)
        log.info("loaded %d/%d tensors from %s", len(usable), len(own), model.weights_path)
    return network


class Classifier(pl.LightningModule):
    def __init__(self, network: nn.Module, optimizer: str, learning_rate: float, weight_decay: float,
                 lr_schedule: str):
        super().__init__()
        self.network = network
        self.optimizer, self.learning_rate, self.weight_decay = optimizer, learning_rate, weight_decay
        self.lr_schedule = lr_schedule
        self.loss = nn.CrossEntropyLoss()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)

    def training_step(self, batch, _):
        x, y = batch
        loss = self.loss(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch, _):
        x, y = batch
        logits = self(x)
        self.log("val_loss", self.loss(logits, y), prog_bar=True)
        self.log("val_accuracy", (logits.argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        params = self.parameters()
        if self.optimizer == "sgd":
            optimizer = torch.optim.SGD(params, lr=self.learning_rate, momentum=0.9, weight_decay=self.weight_decay)
        else:
            kind = torch.optim.AdamW if self.optimizer == "adamw" else torch.optim.Adam
            optimizer = kind(params, lr=self.learning_rate, weight_decay=self.weight_decay)
        if self.lr_schedule == "constant":
            return optimizer
        # cosine to 0, stepped every batch: the last epochs move the weights little, so the model
        # a build exports does not depend on where the last constant-rate step happened to land
        steps = max(1, int(self.trainer.estimated_stepping_batches))
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": cosine, "interval": "step"}}


@dataclass
class Trained:
    network: nn.Module
    spec: ModelSpec
    weights: Path  # state dict of the fitted network
    metrics: dict[str, float]


def _update_batchnorm(network: nn.Module, files: list[tuple[Path, int]], spec: ModelSpec, batch_size: int) -> None:
    """Re-estimate BatchNorm running statistics over the training set (torch's `update_bn`).

    Short from-scratch runs leave slow-moving running averages (MobileNetV3 uses momentum 0.01)
    far from the data's statistics, which ruins eval-mode accuracy.
    """
    loader = DataLoader(ImageDataset(files, spec), batch_size=batch_size)
    with torch.no_grad():
        torch.optim.swa_utils.update_bn((x for x, _ in loader), network)


def _accuracy(network: nn.Module, loader: DataLoader) -> float:
    """Eval-mode accuracy of `network` over `loader`."""
    right = total = 0
    with torch.no_grad():
        for x, y in loader:
            right += int((network(x).argmax(1) == y).sum())
            total += len(y)
    return right / total if total else float("nan")


def model_spec(config: BuildConfig, classes: list[str]) -> ModelSpec:
    return ModelSpec(tuple(classes), config.data.input_size, config.data.mean, config.data.std)


def trainer_settings(config: BuildConfig) -> dict:
    """`lightning.Trainer` arguments from `conf/train`: the same YAML runs on a CPU or on DDP."""
    t = config.train
    return {
        "max_epochs": t.max_epochs,
        "accelerator": t.accelerator,
        "devices": t.devices,
        "strategy": t.strategy,
        "num_nodes": t.num_nodes,
        "precision": t.precision,
        "deterministic": t.deterministic,
        "enable_progress_bar": t.progress_bar,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "log_every_n_steps": 1,
    }


def data_loader(files: list[tuple[Path, int]], spec: ModelSpec, t: TrainConfig, train: bool) -> DataLoader:
    """The training input pipeline of one split: shuffled (and flipped, with `train.hflip`) for
    training, `train.num_workers` data-loader processes."""
    return DataLoader(
        ImageDataset(files, spec, hflip=t.hflip and train),
        batch_size=t.batch_size,
        shuffle=train,
        num_workers=t.num_workers,
        persistent_workers=t.num_workers > 0,
        # forked workers inherit the flow engine's threads and die at shutdown; spawn is clean
        multiprocessing_context="spawn" if t.num_workers > 0 else None,
    )


def train(config: BuildConfig, data: Prepared, workdir: Path, logger=None) -> Trained:
    """Fit the configured network on `data` (train/val splits); `logger` is a Lightning logger."""
    pl.seed_everything(config.seed, workers=True, verbose=False)
    spec = model_spec(config, data.classes)
    t = config.train
    loaders = {split: data_loader(data.files(split), spec, t, train=split == "train") for split in ("train", "val")}
    module = Classifier(build_network(config.model, len(data.classes)), t.optimizer, t.learning_rate, t.weight_decay,
                        t.lr_schedule)
    trainer = pl.Trainer(**trainer_settings(config), logger=logger if logger is not None else False, default_root_dir=str(workdir))
    trainer.fit(module, loaders["train"], loaders["val"])
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    network = module.network.cpu()
    if t.update_bn:
        _update_batchnorm(network, data.files("train"), spec, t.batch_size)
    network.eval()
    # the network as exported, in eval mode: the figure the gate and a sweep agree with (the progress
    # bar's was taken before BatchNorm re-estimation)
    metrics["val_accuracy_final"] = _accuracy(network, loaders["val"])
    log.info("val_accuracy %.3f after fitting%s (the progress bar showed %.3f)", metrics["val_accuracy_final"],
             " and BatchNorm re-estimation" if t.update_bn else "", metrics.get("val_accuracy", float("nan")))
    if logger is not None and trainer.is_global_zero:
        logger.log_metrics({"val_accuracy_final": metrics["val_accuracy_final"]})
    workdir.mkdir(parents=True, exist_ok=True)
    weights = workdir / "weights.pt"
    if trainer.is_global_zero:
        torch.save(network.state_dict(), weights)
    return Trained(network, spec, weights, metrics)
