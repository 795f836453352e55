"""Small pieces the callback tests share: a tiny module, fixed batches, a random basis, a capturing logger."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.loggers import Logger

from safeproj.core.basis import build_basis
from safeproj.core.deltas import TensorDelta, select_names
from safeproj.model.loading import load_model


class TinyLM(L.LightningModule):
    """A tiny causal LM with a chosen optimizer; `.model`/`.tokenizer` as safeproj expects."""

    def __init__(self, optimizer: str = "adamw", lr: float = 1e-2, lora: bool = False, seed: int = 0):
        super().__init__()
        self.model, self.tokenizer = load_model("tiny", seed=seed)
        self.model_name = "tiny"
        if lora:
            from peft import LoraConfig, get_peft_model

            self.model = get_peft_model(
                self.model,
                LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "o_proj", "down_proj"]),
            )
        self.optimizer, self.lr = optimizer, lr

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr)
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0)


def batch(seed: int = 0, size: int = 4, length: int = 16, vocab: int = 101) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (size, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


class Repeat(torch.utils.data.Dataset):
    """The same batches in order, so a resumed run sees exactly what an uninterrupted one saw."""

    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        return self.batches[i]


def loader(n: int, seed: int = 0, size: int = 4):
    data = Repeat([batch(seed + i, size=size) for i in range(n)])
    return torch.utils.data.DataLoader(data, batch_size=None, shuffle=False)


def random_basis(model: torch.nn.Module, path, frac: float = 0.25, side: str = "left", seed: int = 0, selection="top"):
    """A basis from a random full-rank delta over the model's projection matrices, saved to `path`."""
    g = torch.Generator().manual_seed(1000 + seed)
    names = select_names([n for n, _ in model.named_parameters()])
    start = {n: p.detach().clone() for n, p in model.named_parameters() if n in names}
    end = {n: w + torch.randn(w.shape, generator=g) for n, w in start.items()}
    basis = build_basis(TensorDelta(end, start), frac=frac, side=side, selection=selection, seed=seed, progress=False)
    basis.save(str(path))
    return basis


def trainer(tmp_path, steps: int, callbacks=(), logger=False, **kwargs) -> L.Trainer:
    return L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        callbacks=list(callbacks),
        **kwargs,
    )


ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class RandomTokensLM(L.LightningModule):
    """`load_model("tiny")`, optionally with peft LoRA on every projection; Adam steps on `rows` random token rows."""

    def __init__(self, lora: bool = False, rows: int = 32):
        super().__init__()
        self.rows = rows
        self.model, self.tokenizer = load_model("tiny")
        if lora:
            from peft import LoraConfig, get_peft_model

            torch.manual_seed(0)
            config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=ALL_PROJECTIONS)
            self.model = get_peft_model(self.model, config)

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self):
        return torch.optim.Adam([p for p in self.model.parameters() if p.requires_grad], lr=1e-2)

    def train_dataloader(self):
        data = torch.randint(4, len(self.tokenizer), (self.rows, 12), generator=torch.Generator().manual_seed(0))
        return torch.utils.data.DataLoader(data, batch_size=4)


class Capture(Logger):
    """Keeps every logged metrics dict with its step."""

    def __init__(self):
        super().__init__()
        self.logged: list[tuple[int, dict]] = []

    @property
    def name(self):
        return "capture"

    @property
    def version(self):
        return 0

    def log_metrics(self, metrics, step=None):
        self.logged.append((step, dict(metrics)))

    def log_hyperparams(self, *args, **kwargs):
        pass
