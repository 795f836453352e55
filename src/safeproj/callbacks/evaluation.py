"""Utility (GSM8k) and harm (AdvBench + judge) evaluation as Lightning callbacks.

Both run at validation end (if enabled, every n-th validation) and at train end, log numbers under
`utility/` and `harm/`, log the per-sample table to W&B when a WandbLogger is attached, and expose
`evaluate(pl_module)` so post hoc projection can score each weight variant without a Trainer.
Under a distributed run every rank must call `evaluate`: each generates for its share of the
prompts and the summed metric states are synced.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from safeproj.eval.gsm8k import BUILTIN_PREFIX, builtin_split, evaluate_gsm8k
from safeproj.eval.harm import evaluate_harm
from safeproj.eval.judges import Judge, RefusalJudge
from safeproj.eval.stats import harm_report, utility_report


def _positive(name: str, value: int, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise MisconfigurationException(f"`{name}` must be an integer >= {minimum}, got {value!r}")


def _check_dataset(dataset: str, kind: str) -> None:
    if not isinstance(dataset, str) or not dataset:
        raise MisconfigurationException(f"`dataset` must be a non-empty string, got {dataset!r}")
    if dataset.startswith(BUILTIN_PREFIX):
        try:
            builtin_split(dataset, kind)
        except ValueError as err:
            raise MisconfigurationException(f"`dataset`: {err}") from None


def _model_and_tokenizer(pl_module: LightningModule):
    missing = [a for a in ("model", "tokenizer") if getattr(pl_module, a, None) is None]
    if missing:
        raise MisconfigurationException(
            f"{type(pl_module).__name__} has no {' or '.join(missing)}: evaluation needs `.model` "
            "(a Hugging Face causal LM) and `.tokenizer`"
        )
    return pl_module.model, pl_module.tokenizer


def _rank_and_world(pl_module: LightningModule) -> tuple[int, int]:
    trainer = pl_module._trainer  # None outside a Trainer; `.trainer` would raise
    if trainer is None or trainer.world_size == 1:
        return 0, 1
    return trainer.global_rank, trainer.world_size


def _gather_rows(rows: list[dict], world_size: int) -> list[dict]:
    """All ranks' rows in the original order (rank r held items r, r + world, r + 2 world, ...)."""
    if world_size == 1 or not torch.distributed.is_initialized():
        return rows
    parts: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(parts, rows)
    ordered = []
    for i in range(max(len(p) for p in parts)):
        ordered += [p[i] for p in parts if i < len(p)]
    return ordered


class _GenerationEval(Callback):
    """Shared scheduling, logging and state for the evaluation callbacks."""

    prefix = ""

    def __init__(self, every_n_val: int, at_validation: bool, at_train_end: bool, log_table: bool, n_boot: int):
        _positive("every_n_val", every_n_val)
        _positive("n_boot", n_boot)
        self.every_n_val = every_n_val
        self.at_validation = bool(at_validation)
        self.at_train_end = bool(at_train_end)
        self.log_table = bool(log_table)
        self.n_boot = n_boot
        self.validations_seen = 0
        self.last_metrics: dict[str, float] = {}
        self.last_rows: list[dict] = []

    # ---------------------------------------------------------------- work

    def _run(self, model, tokenizer, rank: int, world_size: int) -> tuple[dict[str, float], list[dict]]:
        raise NotImplementedError

    def _report(self, rows: list[dict]) -> dict[str, float]:
        raise NotImplementedError

    def evaluate(self, pl_module: LightningModule) -> dict[str, float]:
        """Metrics (without prefix) for the module's current weights; per-sample rows in `last_rows`."""
        model, tokenizer = _model_and_tokenizer(pl_module)
        rank, world_size = _rank_and_world(pl_module)
        metrics, rows = self._run(model, tokenizer, rank, world_size)
        rows = _gather_rows(rows, world_size)
        # Synced torchmetrics values win over the row-based ones (identical on one process).
        result = {**self._report(rows), **metrics}
        self.last_metrics, self.last_rows = result, rows
        return result

    # ---------------------------------------------------------------- hooks

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.at_validation or trainer.sanity_checking:
            return
        self.validations_seen += 1
        if self.validations_seen % self.every_n_val:
            return
        metrics = self.evaluate(pl_module)
        pl_module.log_dict(self._prefixed(metrics), on_step=False, on_epoch=True, sync_dist=False)
        self._log_samples(trainer)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.at_train_end:
            return
        metrics = self._prefixed(self.evaluate(pl_module))
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
            rank_zero_info(", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if not k.endswith(("_low", "_high"))))
        self._log_samples(trainer)

    def _prefixed(self, metrics: dict[str, float]) -> dict[str, float]:
        return {f"{self.prefix}/{k}": float(v) for k, v in metrics.items()}

    def _log_samples(self, trainer: Trainer) -> None:
        if self.log_table and self.last_rows:
            from safeproj.wandb import log_table

            log_table(trainer.loggers, f"{self.prefix}/samples", self.last_rows, step=trainer.global_step)

    # ---------------------------------------------------------------- state

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"validations_seen": self.validations_seen, "last_metrics": dict(self.last_metrics)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.validations_seen = int(state_dict.get("validations_seen", 0))
        self.last_metrics = dict(state_dict.get("last_metrics", {}))


class UtilityEval(_GenerationEval):
    """GSM8k-style utility: greedy answers to math problems, strict and flexible exact match.

    Args:
        dataset: "builtin:useful-test" (offline), a local GSM8k .jsonl, or a hub name ("openai/gsm8k").
        num_samples: problems evaluated (the first ones of the set).
        n_shot: worked exemplars placed as earlier chat turns (0 for chat models).
        fewshot_source: where exemplars come from; default the set's train split.
        max_new_tokens: generation budget per answer.
        batch_size: prompts per generation batch.
        stop: extra stop strings besides eos.
        every_n_val: evaluate on every n-th validation (when `at_validation`).
        at_validation: evaluate at validation epoch end (sanity checks excluded).
        at_train_end: evaluate once training ends.
        seed: picks the built-in problems and the exemplars.
        log_table: log per-sample rows to W&B when a WandbLogger is attached.
        n_boot: bootstrap resamples for the 95 % intervals.

    Raises:
        MisconfigurationException: a count below its minimum or an unknown built-in set.
    """

    prefix = "utility"

    def __init__(
        self,
        dataset: str = "builtin:useful-test",
        num_samples: int = 16,
        n_shot: int = 0,
        fewshot_source: str | None = None,
        max_new_tokens: int = 128,
        batch_size: int = 8,
        stop: list[str] | None = None,
        every_n_val: int = 1,
        at_validation: bool = False,
        at_train_end: bool = True,
        seed: int = 0,
        log_table: bool = True,
        n_boot: int = 1000,
    ):
        super().__init__(every_n_val, at_validation, at_train_end, log_table, n_boot)
        _check_dataset(dataset, "useful")
        _positive("num_samples", num_samples)
        _positive("n_shot", n_shot, minimum=0)
        _positive("max_new_tokens", max_new_tokens)
        _positive("batch_size", batch_size)
        if stop is not None and not all(isinstance(s, str) and s for s in stop):
            raise MisconfigurationException(f"`stop` must be a list of non-empty strings, got {stop!r}")
        self.dataset = dataset
        self.num_samples = num_samples
        self.n_shot = n_shot
        self.fewshot_source = fewshot_source
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.stop = list(stop) if stop else None
        self.seed = seed

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(dataset=self.dataset, num_samples=self.num_samples, n_shot=self.n_shot)

    def _run(self, model, tokenizer, rank, world_size):
        return evaluate_gsm8k(
            model,
            tokenizer,
            dataset=self.dataset,
            num_samples=self.num_samples,
            n_shot=self.n_shot,
            fewshot_source=self.fewshot_source,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
            stop=self.stop,
            seed=self.seed,
            rank=rank,
            world_size=world_size,
            progress=rank == 0,
        )

    def _report(self, rows):
        return utility_report(rows, n_boot=self.n_boot, seed=self.seed)


class HarmEval(_GenerationEval):
    """AdvBench-style harm: greedy responses to harmful prompts, scored by a judge.

    Args:
        dataset: "builtin:harmful-test" (offline), a local AdvBench .csv (`goal`), or a hub name
            ("walledai/AdvBench").
        num_samples: prompts evaluated (the first ones of the set).
        max_new_tokens: generation budget per response (the paper uses 512).
        batch_size: prompts per generation batch.
        judge: scores (prompt, response) pairs; default `RefusalJudge` (offline proxy). In YAML an
            `OpenAIJudge` is given as class_path/init_args; its key stays in the environment.
        every_n_val, at_validation, at_train_end, seed, log_table, n_boot: as for `UtilityEval`.

    Raises:
        MisconfigurationException: a count below its minimum, an unknown built-in set, or a judge
            without a `judge(pairs)` method.
    """

    prefix = "harm"

    def __init__(
        self,
        dataset: str = "builtin:harmful-test",
        num_samples: int = 16,
        max_new_tokens: int = 64,
        batch_size: int = 8,
        judge: Judge | None = None,
        every_n_val: int = 1,
        at_validation: bool = False,
        at_train_end: bool = True,
        seed: int = 0,
        log_table: bool = True,
        n_boot: int = 1000,
    ):
        super().__init__(every_n_val, at_validation, at_train_end, log_table, n_boot)
        _check_dataset(dataset, "harmful")
        _positive("num_samples", num_samples)
        _positive("max_new_tokens", max_new_tokens)
        _positive("batch_size", batch_size)
        if judge is not None and not isinstance(judge, Judge):
            raise MisconfigurationException(f"`judge` must have a judge(pairs) method, got {type(judge).__name__}")
        self.dataset = dataset
        self.num_samples = num_samples
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.judge = judge if judge is not None else RefusalJudge()
        self.seed = seed

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(dataset=self.dataset, num_samples=self.num_samples, judge=repr(self.judge))

    def _run(self, model, tokenizer, rank, world_size):
        return evaluate_harm(
            model,
            tokenizer,
            judge=self.judge,
            dataset=self.dataset,
            num_samples=self.num_samples,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
            seed=self.seed,
            rank=rank,
            world_size=world_size,
            progress=rank == 0,
        )

    def _report(self, rows):
        return harm_report(rows, n_boot=self.n_boot, seed=self.seed)
