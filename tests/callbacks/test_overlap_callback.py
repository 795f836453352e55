"""OverlapCallback on short runs of the tiny model: full fine-tuning, a start directory, LoRA, resume."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import FSDPStrategy
from safetensors.torch import save_file

from helpers.overlap import write_checkpoint
from safeproj.callbacks.overlap import OverlapCallback
from safeproj.core.deltas import TensorDelta, delta_from_spec, select_names
from safeproj.core.overlap import mso_tables
from safeproj.model.loading import load_model

ETAS = [0.3, 0.6, 0.9]


class TinyLM(L.LightningModule):
    """The tiny preset at `.model`/`.tokenizer`, trained with plain SGD."""

    def __init__(self, lora: bool = False, lr: float = 0.5):
        super().__init__()
        self.model, self.tokenizer = load_model("tiny")
        if lora:
            from peft import LoraConfig, get_peft_model

            config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
            self.model = get_peft_model(self.model, config)
        self.lr = lr

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def random_batches(vocab: int, steps: int = 3, batch: int = 4, length: int = 16):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab, (steps * batch, length), generator=gen)
    rows = [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": i.clone()} for i in ids]
    return torch.utils.data.DataLoader(rows, batch_size=batch)


def fit(module, callback, root: Path, steps: int = 3):
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=CSVLogger(root, name="csv"),
        callbacks=[callback],
        default_root_dir=root,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, random_batches(len(module.tokenizer), steps))
    return trainer


def hf_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture
def reference(tmp_path):
    """`TUNED,BASE` of the tiny model: its projections plus a random update."""
    model, _ = load_model("tiny")
    names = select_names([n for n, _ in model.named_parameters()])
    base = {n: p.detach().clone() for n, p in model.named_parameters() if n in names}
    gen = torch.Generator().manual_seed(5)
    tuned = {n: t + 0.01 * torch.randn(t.shape, generator=gen) for n, t in base.items()}
    return f"{write_checkpoint(tmp_path / 'ref_tuned', tuned)},{write_checkpoint(tmp_path / 'ref_base', base)}"


def expected_rows(end: dict, start: dict, spec: str) -> list[dict]:
    return mso_tables(TensorDelta(end, start), {"ref": delta_from_spec(spec)}, ETAS, warn_unshared=False)["ref"]


def assert_same_rows(got: list[dict], want: list[dict]) -> None:
    assert [(r["name"], r["eta"], r["k_v"], r["k_w"]) for r in got] == [
        (r["name"], r["eta"], r["k_v"], r["k_w"]) for r in want
    ]
    for g, w in zip(got, want):
        assert g["mso"] == pytest.approx(w["mso"], abs=1e-5)


@pytest.mark.parametrize("start", ["memory", "base_dir"])
def test_full_fine_tuning_run_is_compared_with_its_reference(tmp_path, reference, start, monkeypatch):
    import safeproj.wandb

    logged = {"tables": [], "images": []}

    def record(kind):
        return lambda loggers, key, items, step=None: logged[kind].append((key, items))

    monkeypatch.setattr(safeproj.wandb, "log_table", record("tables"))
    monkeypatch.setattr(safeproj.wandb, "log_images", record("images"))

    module = TinyLM()
    initial = hf_weights(module.model)
    if start == "base_dir":
        save_file({n: t.contiguous() for n, t in initial.items()}, str(tmp_path / "model.safetensors"))
        module.base_dir = str(tmp_path)
    callback = OverlapCallback({"ref": reference}, etas=ETAS)
    fit(module, callback, tmp_path)

    # Weights were trained, and no full copy was kept when the start directory had them.
    assert callback._start_dir == (str(tmp_path) if start == "base_dir" else None)
    rows = callback.tables["ref"]
    assert_same_rows(rows, expected_rows(hf_weights(module.model), initial, reference))
    assert len(rows) == 14 * len(ETAS)

    out = tmp_path / "overlap"
    with open(out / "ref.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    for png in ("ref_mso_vs_eta.png", "ref_ratio_heatmap.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    metrics_file = next((tmp_path / "csv").rglob("metrics.csv"))
    header = metrics_file.read_text().splitlines()[0].split(",")
    assert {f"overlap/ref/{k}@{e:g}" for k in ("mso", "baseline", "ratio") for e in ETAS} <= set(header)
    assert logged["tables"][0][0] == "overlap/ref/table" and logged["tables"][0][1] == rows
    pngs = [str(out / "ref_mso_vs_eta.png"), str(out / "ref_ratio_heatmap.png")]
    assert logged["images"][0] == ("overlap/ref/plots", pngs)


def test_lora_run_uses_the_merged_update(tmp_path, reference):
    module = TinyLM(lora=True)
    callback = OverlapCallback({"ref": reference}, etas=ETAS, out_dir=str(tmp_path / "lora_overlap"))
    fit(module, callback, tmp_path)
    merged, zeros = {}, {}
    for name, sub in module.model.named_modules():
        if hasattr(sub, "lora_A") and "default" in sub.lora_A:
            key = name.removeprefix("base_model.model.") + ".weight"
            B, A = sub.lora_B["default"].weight, sub.lora_A["default"].weight
            merged[key] = sub.scaling["default"] * (B @ A).detach()
            zeros[key] = torch.zeros_like(merged[key])
    assert len(merged) == 4 and all(t.abs().max() > 0 for t in merged.values())
    rows = callback.tables["ref"]
    assert {r["module"] for r in rows} == {"q", "v"}
    assert_same_rows(rows, expected_rows(merged, zeros, reference))
    assert (tmp_path / "lora_overlap" / "ref.csv").is_file()


def test_resumed_run_measures_from_the_original_start(reference):
    module = SimpleNamespace(model=load_model("tiny")[0])
    trainer = SimpleNamespace(is_global_zero=True, strategy=object())
    name = "model.layers.0.self_attn.q_proj.weight"
    first = OverlapCallback({"ref": reference})
    first.setup(trainer, module, "fit")
    first.on_train_start(trainer, module)
    original = module.model.get_parameter(name).detach().clone()
    state = first.state_dict()
    assert set(state["start"]) == set(first._targets)

    with torch.no_grad():
        module.model.get_parameter(name).add_(1.0)  # training went on before the resume
    second = OverlapCallback({"ref": reference})
    second.load_state_dict(state)
    second.setup(trainer, module, "fit")
    second.on_train_start(trainer, module)
    torch.testing.assert_close(second._run.held[name], original)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"references": {}}, "at least one"),
        ({"references": {"a/b": "x,y"}}, "label 'a/b'"),
        ({"references": {"ref": ""}}, "non-empty"),
        ({"references": {"ref": "x,y"}, "etas": [0.5, 0.0]}, "eta=0.0"),
        ({"references": {"ref": "x,y"}, "side": "both"}, "side='both'"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        OverlapCallback(**kwargs)


def test_unreadable_reference_fails_before_training(tmp_path):
    module = TinyLM()
    before = hf_weights(module.model)
    with pytest.raises(MisconfigurationException, match=r"reference 'ref'"):
        fit(module, OverlapCallback({"ref": str(tmp_path / "missing")}), tmp_path)
    torch.testing.assert_close(hf_weights(module.model), before)


def test_fsdp_v1_is_refused_at_setup():
    trainer = SimpleNamespace(strategy=FSDPStrategy(), default_root_dir=".", is_global_zero=True)
    with pytest.raises(ValueError, match=r"^OverlapCallback does not support FSDP \(FSDPStrategy\)") as err:
        OverlapCallback({"safety": "tuned,base"}).setup(trainer, SimpleNamespace(), "fit")
    assert "\n" not in str(err.value)
