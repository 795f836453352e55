"""ActivationRecorder: residual-stream activations of fixed prompt sets, recorded during training.

At train start, every `every_n_steps` optimizer steps and at train end, the prompt sets are run
through the model with forward hooks on chosen decoder layers. One vector per prompt and layer is
kept (the last prompt token, the mean over the prompt's tokens, or the mean over the assistant
marker of the chat template) and streamed to safetensors shards:

    out_dir/step_{step}/{set}_layer{L}_shard{i}.safetensors   (tensor "activations": rows × hidden)
    out_dir/step_{step}/manifest.json                           (written last: the step is complete)

A step is written into a hidden folder and renamed when complete, so a crash never leaves a
half-written step behind. At train end the recordings are analysed (`safeproj.core.activations`).

The layer output recorded is the hidden state leaving the decoder layer, i.e.
`output_hidden_states[L + 1]` for every layer but the last one, where Hugging Face reports the
output after the final norm instead.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm
from typing_extensions import override
from safeproj.io import atomic_dir, atomic_file, write_json

POSITIONS = ("last", "mean", "assistant")
STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Band of depth (as a share of the layer stack) where the paper looked at activations.
DEFAULT_BAND = (0.65, 0.90)
DEFAULT_PROMPT_SETS = {"harmful": "builtin:harmful-test", "useful": "builtin:useful-test"}
SHARD_FORMAT = "safeproj.activations/1"
MANIFEST = "manifest.json"
_SET_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


# --------------------------------------------------------------------------------------------
# Layers and prompts


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a Hugging Face causal LM, looking through a PEFT wrapper."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    for owner in (decoder, base):
        for attr in ("layers", "h"):
            layers = getattr(owner, attr, None) if owner is not None else None
            if isinstance(layers, nn.ModuleList):
                return layers
    raise ValueError(f"cannot find the decoder layers of {type(base).__name__} (looked for get_decoder().layers)")


def decoder_module(model: nn.Module) -> nn.Module:
    """The module that runs embeddings + decoder layers without the LM head (cheaper to call)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    return decoder if isinstance(decoder, nn.Module) and decoder is not base else base


def resolve_layers(layers: Sequence[int | float] | None, depth: int) -> list[int]:
    """Layer indices from indices (int) or shares of depth (float in [0, 1]); sorted, unique.

    A share f picks layer round(f·(depth − 1)). None picks the default band of depth, or the layer
    nearest its middle when the model is too shallow to have a layer inside it.
    """
    if depth < 1:
        raise ValueError(f"the model has no decoder layers (depth {depth})")
    last = depth - 1
    if layers is None:
        low, high = DEFAULT_BAND
        picked = [i for i in range(depth) if last == 0 or low <= i / last <= high]
        return picked or [round((low + high) / 2 * last)]
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or len(layers) == 0:
        raise ValueError(f"layers must be a non-empty list of indices or depth shares, got {layers!r}")
    picked = set()
    for value in layers:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"layers entries must be int indices or float shares, got {value!r}")
        if isinstance(value, float):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"layer share {value} is outside [0, 1]")
            picked.add(round(value * last))
        elif not 0 <= value < depth:
            raise ValueError(f"layer index {value} is out of range: the model has {depth} layers (0..{last})")
        else:
            picked.add(int(value))
    return sorted(picked)


def load_prompt_set(spec: str, num_prompts: int, seed: int = 0) -> list[str]:
    """The first `num_prompts` prompts of a prompt-set spec (fewer if the set is smaller).

    Specs: a built-in generated set (`builtin:harmful-test`, `builtin:useful-test`, or any name in
    `safeproj.data.synthetic.BUILTIN`); a local `.json`/`.jsonl`/`.csv` file; or a Hugging Face
    dataset `org/name[@split]` (split defaults to train). A `#field` suffix names the column, else
    the first present of prompt / instruction / question / query / goal is used.
    """
    from safeproj.data import sources, synthetic

    if isinstance(num_prompts, bool) or not isinstance(num_prompts, int) or num_prompts < 1:
        raise ValueError(f"num_prompts must be an integer >= 1, got {num_prompts!r}")
    if spec.startswith("builtin:"):
        if spec not in synthetic.BUILTIN:
            raise ValueError(f"unknown built-in prompt set {spec!r}; known: {', '.join(sorted(synthetic.BUILTIN))}")
        capacity = synthetic.builtin_capacity(spec)
        n = num_prompts if capacity is None else min(num_prompts, capacity)
        return [str(r["prompt"]) for r in synthetic.BUILTIN[spec](n, seed)]
    source, _, field = spec.partition("#")
    if sources._is_local(source):
        records = sources._read_local(source)
        columns = list(dict.fromkeys(key for row in records for key in row))
    elif source.count("/") == 1 and not source.startswith((".", "/", "~")):
        name, _, split = source.partition("@")
        table = sources._load_hub(name, None, split or "train")
        columns = list(table.column_names)
        records = table.select(range(min(num_prompts, len(table)))).to_list()
    else:
        raise ValueError(
            f"unknown prompt set {spec!r}: use builtin:harmful-test / builtin:useful-test, "
            "a .json/.jsonl/.csv file, or a Hugging Face dataset name 'org/name[@split][#field]'"
        )
    if not records:
        return []
    key = field or next((f for f in sources.PROMPT_FIELDS if f in columns), None)
    if key is None or key not in columns:
        want = field or " | ".join(sources.PROMPT_FIELDS)
        raise ValueError(f"prompt set {spec!r} has no field {want}; fields are {', '.join(columns)}")
    prompts = [str(r[key]) for r in records if r.get(key) is not None and str(r[key]).strip()]
    return prompts[:num_prompts]


# --------------------------------------------------------------------------------------------
# Tokenized prompts and left-padded batches


@dataclass(frozen=True)
class EncodedPrompt:
    """Token ids of one formatted prompt and the positions whose hidden states are averaged."""

    ids: tuple[int, ...]
    positions: tuple[int, ...]


def generation_suffix(tokenizer, prompt: str) -> str:
    """The text the chat template appends for the assistant turn (its generation prompt)."""
    from safeproj.data.templates import CHAT_TEMPLATE

    messages = [{"role": "user", "content": prompt}]
    # The same template choice as safeproj.data.templates.format_prompt.
    template = None if getattr(tokenizer, "chat_template", None) else CHAT_TEMPLATE
    def render(turn: bool) -> str:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=turn
        )

    with_turn, without = render(True), render(False)
    if not with_turn.startswith(without) or len(with_turn) == len(without):
        raise ValueError("position='assistant' needs a chat template that appends a generation prompt")
    return with_turn[len(without) :]


def encode_prompts(tokenizer, prompts: Sequence[str], position: str) -> list[EncodedPrompt]:
    """Format each prompt with the chat template and pick the positions `position` reads."""
    from safeproj.data.templates import format_prompt

    if position not in POSITIONS:
        raise ValueError(f"position must be one of {POSITIONS}, got {position!r}")
    encoded = []
    for prompt in prompts:
        text = format_prompt(tokenizer, prompt)
        # The chat template already holds any special tokens the model expects.
        offsets = position == "assistant" and bool(getattr(tokenizer, "is_fast", False))
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=offsets)
        ids = tuple(int(i) for i in enc["input_ids"])
        if not ids:
            raise ValueError(f"prompt {prompt[:40]!r} encodes to no tokens")
        if position == "last":
            positions = (len(ids) - 1,)
        elif position == "mean":
            positions = tuple(range(len(ids)))
        else:
            positions = _assistant_positions(tokenizer, text, prompt, enc)
        encoded.append(EncodedPrompt(ids, positions))
    return encoded


def _assistant_positions(tokenizer, text: str, prompt: str, enc) -> tuple[int, ...]:
    suffix = generation_suffix(tokenizer, prompt)
    if not text.endswith(suffix):
        raise ValueError(
            "position='assistant': the formatted prompt does not end with the chat template's generation prompt"
        )
    boundary = len(text) - len(suffix)
    n = len(enc["input_ids"])
    if "offset_mapping" in enc:
        # Every token that overlaps the suffix (a token straddling the boundary counts).
        positions = tuple(i for i, (_, end) in enumerate(enc["offset_mapping"]) if end > boundary)
    else:
        prefix = tokenizer(text[:boundary], add_special_tokens=False)["input_ids"]
        positions = tuple(range(len(prefix), n))
    if not positions:
        raise ValueError("position='assistant': the generation prompt encodes to no tokens")
    return positions


@dataclass
class PaddedBatch:
    """A left-padded batch plus a gather plan that reads only real (non-pad) positions.

    Row b of the recorded output is the mean of hidden[rows[j], cols[j]] over the j with groups[j] == b.
    """

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    position_ids: torch.Tensor  # (B, T); real tokens count from 0 whatever the padding
    rows: torch.Tensor  # (N,)
    cols: torch.Tensor  # (N,)
    counts: torch.Tensor  # (B,) positions averaged per prompt

    def to(self, device: torch.device | str) -> PaddedBatch:
        fields = (self.input_ids, self.attention_mask, self.position_ids, self.rows, self.cols, self.counts)
        return PaddedBatch(*(t.to(device) for t in fields))


def left_pad(encoded: Sequence[EncodedPrompt], pad_id: int) -> PaddedBatch:
    """Left-pad prompts to one length and plan which positions are read."""
    width = max(len(e.ids) for e in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    rows, cols, counts = [], [], []
    for b, e in enumerate(encoded):
        shift = width - len(e.ids)
        input_ids[b, shift:] = torch.tensor(e.ids, dtype=torch.long)
        attention_mask[b, shift:] = 1
        rows += [b] * len(e.positions)
        cols += [shift + p for p in e.positions]
        counts.append(len(e.positions))
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return PaddedBatch(
        input_ids,
        attention_mask,
        position_ids,
        torch.tensor(rows, dtype=torch.long),
        torch.tensor(cols, dtype=torch.long),
        torch.tensor(counts, dtype=torch.long),
    )


def select_rows(hidden: torch.Tensor, batch: PaddedBatch) -> torch.Tensor:
    """(B, T, d) hidden states → (B, d) fp32, averaging the planned positions; pads are never read."""
    picked = hidden[batch.rows, batch.cols].float()  # (N, d)
    out = torch.zeros(batch.counts.numel(), hidden.shape[-1], dtype=torch.float32, device=hidden.device)
    out.index_add_(0, batch.rows, picked)
    return out / batch.counts.to(out.dtype).unsqueeze(-1)


# --------------------------------------------------------------------------------------------
# Hooks


@contextmanager
def record_activations(
    model: nn.Module, layers: Sequence[int], dtype: torch.dtype = torch.float32
) -> Iterator[Callable[[PaddedBatch], dict[int, torch.Tensor]]]:
    """Hooks on `layers` for the duration of the block; yields `capture(batch) -> {layer: (B, d) CPU}`.

    Inside the block the model is in eval mode under no_grad; hooks, grad mode and every module's
    train flag are restored on exit, also when the block raises.
    """
    blocks = decoder_layers(model)
    for layer in layers:
        if not 0 <= layer < len(blocks):
            raise ValueError(
                f"layer index {layer} is out of range: the model has {len(blocks)} layers (0..{len(blocks) - 1})"
            )
    decoder = decoder_module(model)
    device = next(model.parameters()).device
    current: dict[str, Any] = {"batch": None, "rows": {}}

    def hook_for(layer: int):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            rows = select_rows(hidden, current["batch"]).to(dtype)
            # A copy on the CPU, never a view of a buffer the model may reuse.
            current["rows"][layer] = rows.detach().to("cpu", copy=True)

        return hook

    def capture(batch: PaddedBatch) -> dict[int, torch.Tensor]:
        current["batch"] = batch.to(device)
        current["rows"] = {}
        decoder(
            input_ids=current["batch"].input_ids,
            attention_mask=current["batch"].attention_mask,
            position_ids=current["batch"].position_ids,
            use_cache=False,
        )
        missing = [layer for layer in layers if layer not in current["rows"]]
        if missing:
            raise RuntimeError(f"decoder layers {missing} did not run during the forward pass")
        rows, current["rows"], current["batch"] = current["rows"], {}, None
        return rows

    training = {module: module.training for module in model.modules()}
    handles = []
    try:
        for layer in layers:
            handles.append(blocks[layer].register_forward_hook(hook_for(layer)))
        model.eval()
        with torch.no_grad():
            yield capture
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in training.items():
            module.train(flag)


# --------------------------------------------------------------------------------------------
# Shards


class ShardWriter:
    """Rows of one (prompt set, layer): buffered and written as a shard every `shard_size` rows."""

    def __init__(self, directory: Path, set_name: str, layer: int, metadata: Mapping[str, str], shard_size: int):
        self.directory = Path(directory)
        self.set_name = set_name
        self.layer = layer
        self.metadata = dict(metadata)
        self.shard_size = shard_size
        self.paths: list[Path] = []
        self.rows_written = 0
        self.bytes_written = 0
        self.max_buffered = 0  # the most rows ever held at once; never above shard_size
        self._rows: list[torch.Tensor] = []
        self._ids: list[int] = []

    @property
    def buffered(self) -> int:
        return len(self._ids)

    def add(self, rows: torch.Tensor, prompt_ids: Sequence[int]) -> None:
        if rows.shape[0] != len(prompt_ids):
            raise ValueError(f"{rows.shape[0]} rows but {len(prompt_ids)} prompt ids")
        start = 0
        while start < len(prompt_ids):
            take = min(self.shard_size - self.buffered, len(prompt_ids) - start)
            self._rows.append(rows[start : start + take])
            self._ids.extend(int(i) for i in prompt_ids[start : start + take])
            self.max_buffered = max(self.max_buffered, self.buffered)
            start += take
            if self.buffered >= self.shard_size:
                self.flush()

    def flush(self) -> None:
        if not self._ids:
            return
        tensor = torch.cat(self._rows).contiguous()
        path = self.directory / f"{self.set_name}_layer{self.layer}_shard{len(self.paths)}.safetensors"
        metadata = {**self.metadata, "shard": str(len(self.paths)), "prompt_ids": json.dumps(self._ids)}
        with atomic_file(path) as tmp:
            save_file({"activations": tensor}, str(tmp), metadata=metadata)
        self.paths.append(path)
        self.rows_written += len(self._ids)
        self.bytes_written += path.stat().st_size
        self._rows, self._ids = [], []


@dataclass
class StepRecord:
    """What one recording wrote."""

    directory: Path
    step: int
    rows: dict[str, int]
    shards: int
    bytes_written: int
    payload_bytes: int  # rows × layers × hidden × dtype size, without safetensors headers
    max_buffered_rows: int


def record_step(
    model: nn.Module,
    prompt_sets: Mapping[str, Sequence[EncodedPrompt]],
    layers: Sequence[int],
    out_dir: str | os.PathLike,
    step: int,
    *,
    position: str,
    pad_id: int,
    batch_size: int = 8,
    shard_size: int = 1024,
    dtype: str = "float32",
    progress: bool = True,
) -> StepRecord:
    """Record every prompt set at `layers` into `out_dir/step_{step}/`, replacing an older one."""
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / f"step_{step}"
    torch_dtype = STORAGE_DTYPES[dtype]
    rows: dict[str, int] = {}
    writers: list[ShardWriter] = []
    hidden = 0
    with atomic_dir(final) as partial, record_activations(model, layers, torch_dtype) as capture:
        for set_name, encoded in prompt_sets.items():
            meta = {
                "format": SHARD_FORMAT, "step": str(step), "set": set_name, "position": position, "dtype": dtype
            }
            set_writers = {
                layer: ShardWriter(partial, set_name, layer, {**meta, "layer": str(layer)}, shard_size)
                for layer in layers
            }
            starts = range(0, len(encoded), batch_size)
            desc = f"activations step {step} {set_name}"
            for start in tqdm(starts, desc=desc, leave=False, disable=not progress):
                chunk = encoded[start : start + batch_size]
                captured = capture(left_pad(chunk, pad_id))
                ids = list(range(start, start + len(chunk)))
                for layer, writer in set_writers.items():
                    hidden = captured[layer].shape[-1]
                    writer.add(captured[layer], ids)
            for writer in set_writers.values():
                writer.flush()
            writers += set_writers.values()
            rows[set_name] = len(encoded)
        manifest = {
            "format": SHARD_FORMAT,
            "step": step,
            "layers": list(layers),
            "position": position,
            "dtype": dtype,
            "hidden_size": hidden,
            "sets": rows,
            "shards": sorted(p.name for w in writers for p in w.paths),
        }
        write_json(partial / MANIFEST, manifest)
    item = torch.empty((), dtype=torch_dtype).element_size()
    return StepRecord(
        directory=final,
        step=step,
        rows=rows,
        shards=sum(len(w.paths) for w in writers),
        bytes_written=sum(w.bytes_written for w in writers),
        payload_bytes=sum(rows.values()) * len(layers) * hidden * item,
        max_buffered_rows=max((w.max_buffered for w in writers), default=0),
    )


def prepare_prompt_sets(
    tokenizer, prompt_sets: Mapping[str, str], num_prompts: int, position: str, max_length: int | None, seed: int = 0
) -> dict[str, list[EncodedPrompt]]:
    """Load, format and tokenize every prompt set; checks emptiness and context length."""
    encoded = {}
    for name, spec in prompt_sets.items():
        prompts = load_prompt_set(spec, num_prompts, seed)
        if not prompts:
            raise ValueError(f"prompt set {name!r} ({spec}) is empty")
        encoded[name] = encode_prompts(tokenizer, prompts, position)
        if max_length is not None:
            for i, e in enumerate(encoded[name]):
                if len(e.ids) > max_length:
                    raise ValueError(
                        f"prompt {i} of set {name!r} has {len(e.ids)} tokens, longer than the model's "
                        f"context (max_position_embeddings={max_length})"
                    )
    return encoded


def context_length(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None)


def pad_token_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0  # masked out anyway


def check_prompt_set_names(prompt_sets: Mapping[str, str]) -> None:
    if not prompt_sets:
        raise ValueError("prompt_sets is empty; give at least one {name: spec}")
    for name, spec in prompt_sets.items():
        if not isinstance(name, str) or not _SET_NAME.match(name):
            raise ValueError(f"prompt set name {name!r} must use only letters, digits, '_' and '-'")
        if not isinstance(spec, str) or not spec:
            raise ValueError(f"prompt set {name!r} needs a spec string, got {spec!r}")


# --------------------------------------------------------------------------------------------
# The callback


class ActivationRecorder(Callback):
    """Records residual-stream activations of fixed prompt sets before, during and after training.

    Args:
        out_dir: where `step_{step}/` folders, plots and `analysis.json` go; default
            `<trainer.default_root_dir>/activations`.
        layers: decoder layer indices (int) or shares of depth (float in [0, 1]); default the
            65–90 % band of depth.
        prompt_sets: name → prompt-set spec (see `load_prompt_set`).
        num_prompts: prompts taken from each set.
        position: "last" prompt token, "mean" over the prompt's tokens, or "assistant" (mean over
            the tokens of the chat template's generation prompt).
        every_n_steps: also record every N optimizer steps; 0 records only at train start and end.
        batch_size: prompts per forward pass.
        shard_size: rows per shard file; at most this many rows are held in memory per layer.
        dtype: storage dtype, "float32" or "bfloat16".
        analyse: analyse the recordings at train end (tables, plots, W&B).
        etas: energy shares for the activation MSO.
        basis: a basis artifact or delta spec (see `safeproj.model.subspaces.resolve_basis`;
            a delta spec is built with its default options, top half of the spectrum, left side)
            to compare the difference-of-means direction with the o_proj / down_proj subspace.
        harmful_set / useful_set: the two prompt sets the analysis contrasts.
        seed: for the built-in prompt sets and the probe split.

    Raises:
        MisconfigurationException: on a bad argument, a layer index outside the model, an empty
            prompt set, or a prompt longer than the model's context.
    """

    def __init__(
        self,
        out_dir: str | None = None,
        layers: list[int | float] | None = None,
        prompt_sets: dict[str, str] | None = None,
        num_prompts: int = 32,
        position: str = "last",
        every_n_steps: int = 0,
        batch_size: int = 8,
        shard_size: int = 1024,
        dtype: str = "float32",
        analyse: bool = True,
        etas: list[float] | None = None,
        basis: str | None = None,
        harmful_set: str = "harmful",
        useful_set: str = "useful",
        seed: int = 0,
    ) -> None:
        super().__init__()
        prompt_sets = dict(DEFAULT_PROMPT_SETS if prompt_sets is None else prompt_sets)
        try:
            check_prompt_set_names(prompt_sets)
            if layers is not None:
                resolve_layers(layers, depth=10**9)  # shape checks only; range is checked in setup
        except ValueError as err:
            raise MisconfigurationException(str(err)) from None
        if position not in POSITIONS:
            raise MisconfigurationException(f"position must be one of {POSITIONS}, got {position!r}")
        if dtype not in STORAGE_DTYPES:
            raise MisconfigurationException(f"dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
        for name, value, low in (("num_prompts", num_prompts, 1), ("every_n_steps", every_n_steps, 0),
                                 ("batch_size", batch_size, 1), ("shard_size", shard_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise MisconfigurationException(f"{name} must be an integer >= {low}, got {value!r}")
        if etas is not None and (not etas or any(not 0.0 < float(e) <= 1.0 for e in etas)):
            raise MisconfigurationException(f"etas must be a non-empty list of values in (0, 1], got {etas!r}")
        if analyse and (harmful_set not in prompt_sets or useful_set not in prompt_sets):
            raise MisconfigurationException(
                f"analyse=True contrasts harmful_set={harmful_set!r} with useful_set={useful_set!r}, "
                f"but prompt_sets has {sorted(prompt_sets)}"
            )
        self.out_dir = out_dir
        self.layers = layers
        self.prompt_sets = prompt_sets
        self.num_prompts = num_prompts
        self.position = position
        self.every_n_steps = every_n_steps
        self.batch_size = batch_size
        self.shard_size = shard_size
        self.dtype = dtype
        self.analyse = analyse
        self.etas = [float(e) for e in etas] if etas is not None else None
        self.basis = basis
        self.harmful_set = harmful_set
        self.useful_set = useful_set
        self.seed = seed
        self.recorded_steps: list[int] = []
        self.last_record: StepRecord | None = None
        self._layer_indices: list[int] = []
        self._encoded: dict[str, list[EncodedPrompt]] = {}
        self._dir: Path | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(out_dir=self.out_dir, prompt_sets=sorted(self.prompt_sets.items()))

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        model, tokenizer = _model_and_tokenizer(pl_module)
        try:
            self._layer_indices = resolve_layers(self.layers, len(decoder_layers(model)))
            self._encoded = prepare_prompt_sets(
                tokenizer, self.prompt_sets, self.num_prompts, self.position, context_length(model), self.seed
            )
        except ValueError as err:
            raise MisconfigurationException(str(err)) from None
        if self.analyse:
            small = {name: len(e) for name, e in self._encoded.items() if len(e) < 2}
            if small:
                raise MisconfigurationException(f"analyse=True needs at least 2 prompts per set; got {small}")
        if self.basis is not None and self.basis.endswith(".safetensors") and not Path(self.basis).is_file():
            raise MisconfigurationException(f"basis file {self.basis} does not exist")
        self._pad_id = pad_token_id(tokenizer)
        self._dir = Path(self.out_dir) if self.out_dir is not None else Path(trainer.default_root_dir) / "activations"

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._record(trainer, pl_module)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        # Micro-batches of one accumulation window share a global_step; record each step once.
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0:
            self._record(trainer, pl_module)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._record(trainer, pl_module)
        if self.analyse and trainer.is_global_zero:
            self._analyse(trainer)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"recorded_steps": list(self.recorded_steps)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.recorded_steps = [int(s) for s in state_dict.get("recorded_steps", [])]

    def _record(self, trainer: Trainer, pl_module: LightningModule) -> None:
        step = trainer.global_step
        if step in self.recorded_steps or self._dir is None:
            return
        self.recorded_steps.append(step)
        if not trainer.is_global_zero:  # every rank holds the same weights; one copy is enough
            return
        model, _ = _model_and_tokenizer(pl_module)
        self.last_record = record_step(
            model,
            self._encoded,
            self._layer_indices,
            self._dir,
            step,
            position=self.position,
            pad_id=self._pad_id,
            batch_size=self.batch_size,
            shard_size=self.shard_size,
            dtype=self.dtype,
            progress=trainer.progress_bar_callback is not None,
        )

    def _analyse(self, trainer: Trainer) -> None:
        from safeproj import wandb as sp_wandb
        from safeproj.core.activations import DEFAULT_ETAS, analyse_recordings, write_report

        try:
            basis = None
            if self.basis is not None:
                from safeproj.core.options import BasisOptions
                from safeproj.model.subspaces import resolve_basis

                basis = resolve_basis(self.basis, BasisOptions())
            report = analyse_recordings(
                self._dir,
                steps=sorted(self.recorded_steps),
                etas=self.etas or DEFAULT_ETAS,
                basis=basis,
                harmful_set=self.harmful_set,
                useful_set=self.useful_set,
                seed=self.seed,
            )
        except (ValueError, FileNotFoundError) as err:
            # The recordings are on disk; a failed analysis should not fail a finished training run.
            rank_zero_warn(
                f"activation analysis skipped ({err}); "
                f"rerun with `safeproj activations --record false --out_dir {self._dir}`"
            )
            return
        files = write_report(report, self._dir)
        rank_zero_info(f"Activation analysis written to {self._dir}")
        loggers = trainer.loggers
        for key in ("mso", "layers", "changes"):
            sp_wandb.log_table(loggers, f"activations/{key}", report[key])
        for name, path in files.items():
            if path.suffix == ".png":
                sp_wandb.log_images(loggers, f"activations/{name}", [str(path)])


def _model_and_tokenizer(pl_module: LightningModule):
    model = getattr(pl_module, "model", None)
    tokenizer = getattr(pl_module, "tokenizer", None)
    if not isinstance(model, nn.Module) or tokenizer is None:
        raise MisconfigurationException(
            "ActivationRecorder needs a LightningModule with .model and .tokenizer; "
            f"{type(pl_module).__name__} lacks them"
        )
    return model, tokenizer
