"""InstructionDataModule: a seeded mixture of instruction sources, tokenized for response-only loss."""

from __future__ import annotations

import functools
import hashlib
import random
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader

from safeproj.data.sampler import EpochShuffle
from safeproj.data.sources import SourceSpec, load_pairs
from safeproj.data.templates import format_example, pad_batch


def largest_remainder(weights: list[float], total: int) -> list[int]:
    """Integer shares of `total` proportional to `weights` that sum to `total` exactly.

    Each share is the floor of its quota; the leftover units go to the largest remainders
    (ties to the earlier entry), so every share is within one of its exact quota.
    """
    if total < 0 or not weights or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(
            "largest_remainder needs total >= 0 and non-negative weights with a positive sum, "
            f"got total={total}, weights={weights}"
        )
    quotas = [w / sum(weights) * total for w in weights]
    shares = [int(q) for q in quotas]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(quotas[i] - shares[i]), i))
    for i in by_remainder[: total - sum(shares)]:
        shares[i] += 1
    return shares


def _source_seed(seed: int, index: int) -> int:
    """An independent stream per source position, stable across runs and platforms."""
    digest = hashlib.blake2b(f"safeproj.mixture:{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


class InstructionDataModule(L.LightningDataModule):
    """Instruction pairs from weighted sources, formatted with the model's chat template.

    Each source contributes round(weight / sum(weights) * num_samples) examples (largest remainder,
    so the counts sum to `num_samples`), each source is split into train and validation in the same
    proportion, and the examples are shuffled together with `seed`. Labels are -100 on prompt tokens
    and padding, so the loss covers responses only. The training order depends on `seed` and the epoch
    only, and checkpoints hold the data position (epoch, batches done), so a run resumed with `ckpt_path`
    sees the batches an uninterrupted run sees (single process; under DDP a resume restarts the epoch).

    Args:
        sources: where examples come from and their weights (see `SourceSpec`).
        num_samples: examples drawn in total (train + validation).
        val_fraction: share of the examples held out for validation, in [0, 1).
        batch_size: examples per batch; batches are padded to their longest sequence.
        max_length: tokens per example; longer responses are cut, over-long prompts dropped.
        seed: drives sampling, mixing, the validation split and the training order.
        num_workers: DataLoader worker processes.
        tokenizer: a Hugging Face tokenizer; by default the LightningModule's `.tokenizer`.

    Raises:
        MisconfigurationException: on a bad argument, a source that cannot be loaded, a source left
            without examples, or no tokenizer.
    """

    def __init__(
        self,
        sources: list[SourceSpec],
        num_samples: int = 512,
        val_fraction: float = 0.05,
        batch_size: int = 4,
        max_length: int = 512,
        seed: int = 0,
        num_workers: int = 0,
        tokenizer: Any = None,
    ) -> None:
        super().__init__()
        self.sources = self._check_sources(sources)
        minimums = {"num_samples": (num_samples, 1), "batch_size": (batch_size, 1), "max_length": (max_length, 2),
                    "num_workers": (num_workers, 0)}  # fmt: skip
        for name, (value, low) in minimums.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise MisconfigurationException(f"{name} must be an integer >= {low}, got {value!r}")
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
            raise MisconfigurationException(f"val_fraction must be in [0, 1), got {val_fraction!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise MisconfigurationException(f"seed must be an integer, got {seed!r}")
        if val_fraction > 0 and num_samples < 2:
            raise MisconfigurationException(
                f"num_samples={num_samples} leaves nothing to train on after a validation split"
            )
        self.num_samples = num_samples
        self.val_fraction = float(val_fraction)
        self.batch_size = batch_size
        self.max_length = max_length
        self.seed = seed
        self.num_workers = num_workers
        self.tokenizer = tokenizer
        self.save_hyperparameters(ignore=["tokenizer", "sources"])
        self.hparams["sources"] = [vars(s).copy() for s in self.sources]
        self.train_examples: list[dict] = []
        self.val_examples: list[dict] = []
        self.train_dataset: list[dict] = []
        self.val_dataset: list[dict] = []
        self.dropped: dict[str, int] = {}
        self._resume: dict[str, int] | None = None  # the data position a checkpoint restored

    @staticmethod
    def _check_sources(sources) -> list[SourceSpec]:
        if not isinstance(sources, (list, tuple)) or not sources:
            raise MisconfigurationException(f"sources must be a non-empty list of SourceSpec, got {sources!r}")
        specs = []
        for i, s in enumerate(sources):
            try:
                specs.append(s if isinstance(s, SourceSpec) else SourceSpec(**s))
            except (TypeError, ValueError) as err:
                raise MisconfigurationException(f"sources[{i}]: {err}") from None
        return specs

    def source_names(self) -> list[str]:
        """One label per source: its path, with `#2`, `#3`... when a path repeats."""
        names, seen = [], {}
        for spec in self.sources:
            seen[spec.path] = seen.get(spec.path, 0) + 1
            names.append(spec.path if seen[spec.path] == 1 else f"{spec.path}#{seen[spec.path]}")
        return names

    def mixture_counts(self) -> dict[str, int]:
        """Examples drawn per source (train + validation, before over-length drops)."""
        counts = largest_remainder([s.weight for s in self.sources], self.num_samples)
        return dict(zip(self.source_names(), counts))

    def _val_counts(self, counts: list[int]) -> list[int]:
        n_val = round(self.val_fraction * self.num_samples)
        if self.val_fraction > 0:
            n_val = min(max(n_val, 1), self.num_samples - 1)
        return largest_remainder(counts, n_val)

    def _resolve_tokenizer(self):
        if self.tokenizer is not None:
            return self.tokenizer
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        tokenizer = getattr(module, "tokenizer", None)
        if tokenizer is None:
            raise MisconfigurationException(
                "InstructionDataModule needs a tokenizer: pass tokenizer=... or train a LightningModule "
                "with a `.tokenizer` attribute"
            )
        return tokenizer

    def _draw(self) -> tuple[list[dict], list[dict]]:
        """Raw (train, validation) examples: {prompt, response, source}, each list shuffled."""
        counts = list(self.mixture_counts().values())
        val_counts = self._val_counts(counts)
        train, val = [], []
        for i, (name, spec, count, n_val) in enumerate(zip(self.source_names(), self.sources, counts, val_counts)):
            if count == 0:
                continue
            try:
                pairs = load_pairs(spec, n=count, seed=_source_seed(self.seed, i))
            except ValueError as err:
                raise MisconfigurationException(f"data source {name!r}: {err}") from None
            rows = [{**pair, "source": name} for pair in pairs]
            # load_pairs already returns a seeded random draw, so its head is a random subset.
            val += rows[:n_val]
            train += rows[n_val:]
        rng = random.Random(f"safeproj.mixture-order:{self.seed}")
        rng.shuffle(train)
        rng.shuffle(val)
        return train, val

    def _tokenize(self, tokenizer, examples: list[dict]) -> tuple[list[dict], list[dict]]:
        kept_examples, features = [], []
        for ex in examples:
            feature = format_example(tokenizer, ex["prompt"], ex["response"], self.max_length)
            if feature is None:
                self.dropped[ex["source"]] = self.dropped.get(ex["source"], 0) + 1
                continue
            kept_examples.append(ex)
            features.append(feature)
        return kept_examples, features

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset:  # built once; later stages reuse it
            return
        tokenizer = self._resolve_tokenizer()
        self._pad_id = self._pad_token_id(tokenizer)
        train, val = self._draw()
        self.dropped = {}
        self.train_examples, self.train_dataset = self._tokenize(tokenizer, train)
        self.val_examples, self.val_dataset = self._tokenize(tokenizer, val)
        kept = {name: 0 for name in self.source_names()}
        for ex in self.train_examples + self.val_examples:
            kept[ex["source"]] += 1
        for name, count in self.mixture_counts().items():
            if count > 0 and kept[name] == 0:
                raise MisconfigurationException(
                    f"data source {name!r}: all {count} examples are longer than max_length={self.max_length} "
                    "in their prompt alone"
                )
        if not self.train_dataset:
            raise MisconfigurationException("InstructionDataModule: no training examples left after tokenization")
        summary = ", ".join(f"{name}={count}" for name, count in kept.items())
        dropped = sum(self.dropped.values())
        rank_zero_info(
            f"InstructionDataModule: {len(self.train_dataset)} train + {len(self.val_dataset)} val examples "
            f"({summary}); dropped {dropped} with prompts over max_length={self.max_length}"
        )

    @staticmethod
    def _pad_token_id(tokenizer) -> int:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise MisconfigurationException("the tokenizer has neither a pad token nor an eos token to pad with")
        return pad

    def _loader(self, dataset: list[dict], shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=self.num_workers,
            collate_fn=functools.partial(pad_batch, pad_id=self._pad_id, side="right"),
        )

    def train_dataloader(self) -> DataLoader:
        sampler = EpochShuffle(len(self.train_dataset), self.seed, **self._data_parallel())
        if self._resume is not None:
            sampler.resume(self._resume["epoch"], self._resume["batches"] * self.batch_size)
        return DataLoader(
            self.train_dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            # Only seeds worker processes; without it the loader would draw from the global RNG (dropout's).
            generator=torch.Generator().manual_seed(self.seed),
            num_workers=self.num_workers,
            collate_fn=functools.partial(pad_batch, pad_id=self._pad_id, side="right"),
        )

    def _data_parallel(self) -> dict[str, int]:
        """This process's place among the data-parallel processes (Lightning's split of the data)."""
        trainer = self.trainer
        if trainer is None or trainer.world_size == 1:
            return {"num_replicas": 1, "rank": 0}
        kwargs = trainer.distributed_sampler_kwargs or {}
        return {
            "num_replicas": kwargs.get("num_replicas", trainer.world_size),
            "rank": kwargs.get("rank", trainer.global_rank),
        }

    def state_dict(self) -> dict[str, Any]:
        """Where training stands in the data: the epoch and the batches of it already trained on."""
        trainer = self.trainer
        # "fit", not `trainer.training`: checkpoints saved after a validation run are mid-fit too.
        if trainer is None or trainer.state.fn != "fit":
            return {}
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"epoch": int(trainer.current_epoch), "batches": int(done)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Runs before the train loader is built (Lightning restores the datamodule first), which applies it.
        if "epoch" in state_dict and "batches" in state_dict:
            self._resume = {"epoch": int(state_dict["epoch"]), "batches": int(state_dict["batches"])}

    def val_dataloader(self) -> DataLoader | list:
        # No validation split: an empty list tells Lightning to skip validation.
        return self._loader(self.val_dataset, shuffle=False) if self.val_dataset else []
