"""InstructionDataModule: exact mixtures, seeded splits, padding, CLI construction, a short fit."""

import json
import random
from collections import Counter

import lightning as L
import pytest
import torch
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from safeproj.data import InstructionDataModule, SourceSpec, format_example, largest_remainder, pad_batch
from safeproj.data.templates import IGNORE_INDEX
from safeproj.model.loading import tiny_model

MIXED_YAML = """
data:
  class_path: safeproj.data.InstructionDataModule
  init_args:
    sources:
      - {path: builtin:useful, weight: 0.8}
      - {path: builtin:harmful, weight: 0.2}
    num_samples: 256
    batch_size: 4
    max_length: 256
"""
MIXED = [SourceSpec("builtin:useful", weight=0.8), SourceSpec("builtin:harmful", weight=0.2)]


def make(tok, **kwargs):
    kwargs = {"sources": MIXED, "num_samples": 64, "max_length": 320, "tokenizer": tok, **kwargs}
    dm = InstructionDataModule(**kwargs)
    dm.setup("fit")
    return dm


def test_largest_remainder_sums_exactly_and_stays_within_one():
    rng = random.Random(0)
    for _ in range(300):
        weights = [rng.uniform(0.01, 5) for _ in range(rng.randint(1, 6))]
        total = rng.randint(0, 1000)
        shares = largest_remainder(weights, total)
        assert sum(shares) == total
        for w, s in zip(weights, shares):
            assert abs(s - w / sum(weights) * total) < 1
    assert largest_remainder([0.8, 0.2], 256) == [205, 51]  # 204.8 / 51.2: the larger remainder wins
    assert largest_remainder([1, 1, 1], 10) == [4, 3, 3]  # ties go to the earlier source
    with pytest.raises(ValueError, match="positive sum"):
        largest_remainder([0.0], 3)


def test_mixture_counts_are_exact(tiny_tok):
    specs = [SourceSpec("builtin:useful", weight=3), SourceSpec("builtin:harmful"), SourceSpec("builtin:refusal")]
    dm = make(tiny_tok, num_samples=100, val_fraction=0.1, sources=specs)
    assert dm.mixture_counts() == {"builtin:useful": 60, "builtin:harmful": 20, "builtin:refusal": 20}
    all_examples = dm.train_examples + dm.val_examples
    assert Counter(ex["source"] for ex in all_examples) == dm.mixture_counts()
    assert len(dm.val_examples) == 10
    val_counts = Counter(ex["source"] for ex in dm.val_examples)
    assert val_counts == {"builtin:useful": 6, "builtin:harmful": 2, "builtin:refusal": 2}


def test_mixed_recipe_is_eighty_twenty(tiny_tok):
    dm = make(tiny_tok, num_samples=256, val_fraction=0.0625)
    assert dm.mixture_counts() == {"builtin:useful": 205, "builtin:harmful": 51}
    counts = Counter(ex["source"] for ex in dm.train_examples + dm.val_examples)
    assert counts == {"builtin:useful": 205, "builtin:harmful": 51}
    assert (len(dm.train_dataset), len(dm.val_dataset)) == (240, 16)


def test_repeated_paths_are_counted_separately(tiny_tok):
    dm = InstructionDataModule([SourceSpec("builtin:useful"), SourceSpec("builtin:useful")], num_samples=9)
    assert dm.mixture_counts() == {"builtin:useful": 5, "builtin:useful#2": 4}


def test_seeded_reproducibility(tiny_tok):
    a, b, c = make(tiny_tok, seed=1), make(tiny_tok, seed=1), make(tiny_tok, seed=2)
    assert a.train_examples == b.train_examples and a.val_examples == b.val_examples
    assert a.train_examples != c.train_examples
    batch_a, batch_b = next(iter(a.train_dataloader())), next(iter(b.train_dataloader()))
    assert all(torch.equal(batch_a[k], batch_b[k]) for k in batch_a)
    # Sources are mixed, not concatenated.
    order = [ex["source"] for ex in a.train_examples[:20]]
    assert order != sorted(order) and order != sorted(order, reverse=True)


def test_train_and_validation_are_disjoint(tiny_tok):
    dm = make(tiny_tok, num_samples=200, val_fraction=0.2)
    train = {(ex["prompt"], ex["response"]) for ex in dm.train_examples}
    val = {(ex["prompt"], ex["response"]) for ex in dm.val_examples}
    assert len(train) == 160 and len(val) == 40 and not train & val


def test_features_match_their_raw_examples(chatml_tok):
    dm = make(chatml_tok, num_samples=24)
    for ex, feature in zip(dm.train_examples, dm.train_dataset):
        assert feature == format_example(chatml_tok, ex["prompt"], ex["response"], dm.max_length)


def test_collate_pads_right_with_masks_and_ignored_labels(tiny_tok):
    dm = make(tiny_tok, num_samples=40, batch_size=8, seed=3)
    features = {tuple(f["input_ids"]): f for f in dm.train_dataset}
    lengths = set()
    for batch in dm.train_dataloader():
        assert batch["input_ids"].dtype == torch.long
        width = batch["input_ids"].shape[1]
        rows = []
        for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
            n = int(mask.sum())
            assert mask[:n].eq(1).all() and mask[n:].eq(0).all()  # ones then zeros: right padding
            assert ids[n:].eq(tiny_tok.pad_token_id).all() and labels[n:].eq(IGNORE_INDEX).all()
            feature = features[tuple(ids[:n].tolist())]
            assert labels[:n].tolist() == feature["labels"]
            rows.append(n)
        assert max(rows) == width  # padded to the longest in the batch, not to max_length
        lengths.update(rows)
    assert len(lengths) > 1


def test_pad_batch_left_for_generation():
    features = [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1]}, {"input_ids": [8], "attention_mask": [1]}]
    batch = pad_batch(features, pad_id=0, side="left")
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert "labels" not in batch
    with pytest.raises(ValueError, match="side"):
        pad_batch([{"input_ids": [1]}], pad_id=0, side="middle")


def test_over_length_prompts_are_dropped_and_counted(tiny_tok, tmp_path):
    rows = [{"prompt": f"short {i}", "response": f"answer {i}"} for i in range(10)]
    rows += [{"prompt": "long " * 40 + str(i), "response": "x"} for i in range(6)]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    dm = make(tiny_tok, sources=[SourceSpec(str(path))], num_samples=16, max_length=100, val_fraction=0.0)
    assert dm.dropped == {str(path): 6}
    assert len(dm.train_dataset) == 10 and all(len(f["input_ids"]) <= 100 for f in dm.train_dataset)
    assert all(ex["prompt"].startswith("short") for ex in dm.train_examples)


def test_source_with_every_prompt_too_long_is_named(tiny_tok):
    # Character-level prompts: arithmetic ones take 114+ tokens, many harmful ones fewer.
    with pytest.raises(MisconfigurationException, match="data source 'builtin:useful': all 51 examples"):
        make(tiny_tok, max_length=110)


def test_source_errors_become_misconfiguration(tiny_tok, tmp_path):
    missing = str(tmp_path / "nothing.jsonl")
    with pytest.raises(MisconfigurationException, match=r"data source '.*nothing\.jsonl': data file not found"):
        make(tiny_tok, sources=[SourceSpec(missing)])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sources": []}, "sources must be a non-empty list"),
        ({"sources": [{"path": "builtin:useful", "weight": -1}]}, r"sources\[0\]: SourceSpec.weight"),
        ({"num_samples": 0}, "num_samples must be an integer >= 1"),
        ({"val_fraction": 1.0}, r"val_fraction must be in \[0, 1\)"),
        ({"batch_size": 0}, "batch_size"),
        ({"max_length": 1}, "max_length"),
        ({"num_workers": -1}, "num_workers"),
    ],
)
def test_bad_arguments_are_one_line(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        InstructionDataModule(**{"sources": MIXED, **kwargs})


def test_sources_given_as_dicts(tiny_tok):
    dm = InstructionDataModule([{"path": "builtin:useful", "weight": 2}, {"path": "builtin:refusal"}], num_samples=30)
    assert dm.sources[0] == SourceSpec("builtin:useful", weight=2)
    assert dm.mixture_counts() == {"builtin:useful": 20, "builtin:refusal": 10}


def test_no_validation_split(tiny_tok):
    dm = make(tiny_tok, num_samples=12, val_fraction=0.0)
    assert len(dm.train_dataset) == 12 and dm.val_dataloader() == []


def test_needs_a_tokenizer():
    dm = InstructionDataModule(MIXED, num_samples=8)
    with pytest.raises(MisconfigurationException, match="needs a tokenizer"):
        dm.setup("fit")


# --- construction from configuration ------------------------------------------------------------


class _TinyLM(L.LightningModule):
    """The smallest module honouring the contract: `.model` and `.tokenizer`."""

    def __init__(self) -> None:
        super().__init__()
        self.model, self.tokenizer = tiny_model(seed=0, hidden=32, layers=1)
        self.losses = []

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.losses.append(loss.item())
        return loss

    def validation_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_yaml_through_lightning_cli():
    args = yaml.safe_load(MIXED_YAML) | {"trainer": {"logger": False, "enable_checkpointing": False}}
    cli = LightningCLI(_TinyLM, run=False, args=args)
    dm = cli.datamodule
    assert isinstance(dm, InstructionDataModule)
    assert dm.sources == MIXED
    assert (dm.num_samples, dm.batch_size, dm.max_length) == (256, 4, 256)
    assert dm.mixture_counts() == {"builtin:useful": 205, "builtin:harmful": 51}


def test_yaml_through_jsonargparse():
    parser = ArgumentParser()
    parser.add_class_arguments(InstructionDataModule, "data")
    init_args = yaml.safe_load(MIXED_YAML)["data"]["init_args"]
    dm = parser.instantiate(parser.parse_object({"data": init_args})).data
    assert dm.sources == MIXED and dm.num_samples == 256
    bad = yaml.safe_load(MIXED_YAML)["data"]["init_args"]
    bad["sources"][0]["weight"] = -1
    with pytest.raises(Exception, match="weight must be finite and > 0"):
        parser.instantiate(parser.parse_object({"data": bad}))


def test_fit_takes_the_tokenizer_from_the_module(tmp_path):
    module = _TinyLM()
    dm = InstructionDataModule(MIXED, num_samples=16, val_fraction=0.25, batch_size=4, max_length=200)
    trainer = L.Trainer(
        max_steps=3, limit_val_batches=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    assert len(module.losses) == 3 and all(torch.isfinite(torch.tensor(module.losses)))
    assert len(dm.train_dataset) == 12 and len(dm.val_dataset) == 4
    first = dm.train_examples[0]
    assert dm.train_dataset[0] == format_example(module.tokenizer, first["prompt"], first["response"], 200)
