"""Evaluation helpers: a test key, a tiny model whose greedy outputs depend on the prompt, a stand-in module."""

from __future__ import annotations

import torch
from lightning.pytorch import LightningModule

from safeproj.model.loading import load_model

SECRET = "sk-test-5ecr3t-do-not-leak-0123456789"


def spread_weights(model, seed: int = 1, std: float = 0.3):
    """Larger random weights, so greedy outputs depend on the prompt (the default init barely does)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


class TinyLM(LightningModule):
    """Stand-in for SafeprojLM: any LightningModule with `.model` and `.tokenizer` must work."""

    def __init__(self):
        super().__init__()
        model, self.tokenizer = load_model("tiny")
        self.model = spread_weights(model)

    def _loss(self, batch):
        ids = batch[0]
        return self.model(input_ids=ids, labels=ids).loss

    def training_step(self, batch, batch_idx):
        return self._loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        return _loader()

    def val_dataloader(self):
        return _loader()


def _loader():
    ids = torch.randint(4, 90, (4, 12), generator=torch.Generator().manual_seed(0))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=2)
