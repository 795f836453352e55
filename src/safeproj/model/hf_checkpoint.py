"""Hugging Face checkpoints of a run: written whole (one process, DDP) or gathered tensor by tensor (FSDP2).

A model sharded by FSDP2 is written without a whole copy on any process: every process gathers one
tensor at a time (`DTensor.full_tensor`, a collective all join in the same order) and rank zero streams
it into its place in a safetensors file whose header was written beforehand from the global shapes and
dtypes. Files hold at most `MAX_SHARD_BYTES` each (a larger tensor gets a file of its own) and are named
and indexed as `save_pretrained` names them: `model.safetensors`, or `model-00001-of-0000n.safetensors`
and `model.safetensors.index.json`. A PEFT model saves its adapter only, which is small: it is gathered
whole and written by PEFT. Every folder is written to a temp folder and renamed into place.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor

from safeproj.io import atomic_dir
from safeproj.runs import RUN_MANIFEST

MAX_SHARD_BYTES = 5 * 2**30
_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def save_hf_checkpoint(
    model, tokenizer, target: Path, manifest: dict | None = None, state_dict: dict | None = None
) -> Path:
    """Write a Hugging Face directory (safetensors) atomically: a temp dir renamed into place.

    A PEFT model saves its adapter only; its manifest names the base weights.
    """
    target = Path(target)
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        if manifest is not None:
            (tmp / RUN_MANIFEST).write_text(json.dumps(manifest, indent=2))
    return target


def is_sharded_model(model: torch.nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def save_gathered_checkpoint(
    model, tokenizer, target: Path, is_writer: bool, manifest: dict | None = None, base_only: bool = False
) -> Path:
    """The Hugging Face checkpoint of a model sharded by FSDP2; every process must call it, `is_writer` writes.

    A PEFT model saves its adapter; with `base_only` its base model's weights (plain HF names) instead.
    """
    target = Path(target)
    if hasattr(model, "get_base_model") and not base_only:
        return _save_gathered_adapter(model, tokenizer, target, is_writer, manifest)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if _converts_weights(base):
        return _save_whole_state_dict(base, tokenizer, target, is_writer, manifest)
    files = plan_files(hf_entries(base), MAX_SHARD_BYTES)
    with atomic_dir(target) if is_writer else nullcontext() as tmp:
        error = _stream_files(files, tmp)
        if tmp is not None and error is None:
            try:
                _write_index(files, tmp)
                _save_config(base, tmp)
                tokenizer.save_pretrained(tmp)
                if manifest is not None:
                    (tmp / RUN_MANIFEST).write_text(json.dumps(manifest, indent=2))
            except Exception as err:
                error = err
        _raise_on_every_rank(error, _device(base))
    return target


@dataclass(frozen=True)
class Entry:
    """One tensor of the checkpoint: its saved name and the (possibly sharded) tensor holding it."""

    name: str
    tensor: Tensor

    @property
    def nbytes(self) -> int:
        return math.prod(self.tensor.shape) * self.tensor.dtype.itemsize


def hf_entries(model: torch.nn.Module) -> list[Entry]:
    """The model's state dict by plain Hugging Face names (LoRA adapters left out), tied copies once.

    Of names sharing one tensor, those the model declares tied (`_tied_weights_keys`, e.g. `lm_head.weight`)
    are dropped, as `save_pretrained` does; loading ties them again.
    """
    tied = set(_tied_names(model))
    groups: dict[int, list[tuple[str, Tensor]]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if "lora_" not in name:
            groups.setdefault(id(tensor), []).append((name.replace(".base_layer", ""), tensor))
    entries = []
    for named in groups.values():
        kept = [(n, t) for n, t in named if n not in tied] or named
        entries.append(Entry(kept[0][0], kept[0][1].detach()))
    return entries


def plan_files(entries: list[Entry], max_bytes: int) -> dict[str, list[Entry]]:
    """Entries in order, cut into files of at most `max_bytes` (one larger tensor alone), named like HF's."""
    groups: list[list[Entry]] = [[]]
    size = 0
    for entry in entries:
        if groups[-1] and size + entry.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += entry.nbytes
    if len(groups) == 1:
        return {"model.safetensors": groups[0]}
    n = len(groups)
    return {f"model-{i + 1:05d}-of-{n:05d}.safetensors": group for i, group in enumerate(groups)}


def gathered(tensor: Tensor) -> Tensor:
    """The whole tensor: a collective for a DTensor (every process of its mesh calls it in the same order)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def safetensors_header(entries: list[Entry]) -> bytes:
    """The safetensors header (length, then JSON padded to 8 bytes) of `entries` stored back to back in order."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for entry in entries:
        if entry.tensor.dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"cannot write {entry.name} of dtype {entry.tensor.dtype} to safetensors")
        shape = list(entry.tensor.shape)
        header[entry.name] = {
            "dtype": _SAFETENSORS_DTYPES[entry.tensor.dtype],
            "shape": shape,
            "data_offsets": [offset, offset + entry.nbytes],
        }
        offset += entry.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _stream_files(files: dict[str, list[Entry]], folder: Path | None) -> BaseException | None:
    """Gathers every entry in order; the writer (a `folder`) streams each into its file as it arrives.

    A failed write is returned, not raised: the writer keeps joining the gathers, so no process is left
    waiting in one, and the error is raised on every process afterwards.
    """
    error: BaseException | None = None
    for file_name, entries in files.items():
        handle = None
        if folder is not None:
            try:
                handle = open(folder / file_name, "wb")  # noqa: SIM115 (closed below, after the gathers)
                handle.write(safetensors_header(entries))
            except OSError as err:
                error = error or err
        for entry in entries:
            full = gathered(entry.tensor)
            if handle is not None and error is None:
                try:
                    handle.write(_raw_bytes(full))
                except OSError as err:
                    error = err
            del full  # before the next gather: one whole tensor at a time
        if handle is not None:
            try:
                handle.close()
            except OSError as err:
                error = error or err
    return error


def _raw_bytes(tensor: Tensor) -> memoryview:
    if sys.byteorder != "little":
        raise OSError("safetensors files are little-endian; this machine is not")
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def _write_index(files: dict[str, list[Entry]], folder: Path) -> None:
    if len(files) == 1:
        return
    index = {
        "metadata": {"total_size": sum(e.nbytes for entries in files.values() for e in entries)},
        "weight_map": {e.name: file_name for file_name, entries in files.items() for e in entries},
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _save_config(model, folder: Path) -> None:
    """config.json and generation_config.json as `save_pretrained` writes them."""
    model.config.dtype = str(model.dtype).split(".")[1]
    model.config.architectures = [type(model).__name__.removeprefix("FSDP")]  # fully_shard renames the class
    if getattr(model, "is_remote_code", lambda: False)():
        from transformers.dynamic_module_utils import custom_object_save

        custom_object_save(model, folder, config=model.config)
    model.config.save_pretrained(folder)
    if model.can_generate() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)


def _save_gathered_adapter(model, tokenizer, target: Path, is_writer: bool, manifest: dict | None) -> Path:
    """A PEFT adapter of a sharded model: its tensors gathered whole (they are small), written by PEFT."""
    from peft import get_peft_model_state_dict

    sharded = model.state_dict(keep_vars=True)
    wanted = {id(t) for t in get_peft_model_state_dict(model, state_dict=sharded).values()}
    adapter = {}
    for name, tensor in sharded.items():
        if id(tensor) in wanted:
            full = gathered(tensor.detach())
            if is_writer:
                adapter[name] = full.to("cpu")
    _write_on_writer(is_writer, lambda: save_hf_checkpoint(model, tokenizer, target, manifest, adapter), model)
    return target


def _save_whole_state_dict(model, tokenizer, target: Path, is_writer: bool, manifest: dict | None) -> Path:
    """Models whose files differ from their modules (transformers' weight conversions, e.g. fused experts):
    the whole state dict gathered to the writer's CPU, and `save_pretrained` converts it back."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    _write_on_writer(is_writer, lambda: save_hf_checkpoint(model, tokenizer, target, manifest, full), model)
    return target


def _write_on_writer(is_writer: bool, write, model) -> None:
    error = None
    if is_writer:
        try:
            write()
        except Exception as err:
            error = err
    _raise_on_every_rank(error, _device(model))


def _converts_weights(model) -> bool:
    """Whether transformers renames or fuses this model's weights between its files and its modules (what
    `save_pretrained` reverts; a prefix change is not one for a model that was not loaded from files)."""
    conversions = getattr(model, "_weight_conversions", None)
    if conversions is not None:
        return bool(conversions)
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange
    except ImportError:
        return False
    return any(not isinstance(c, PrefixChange) for c in get_model_conversion_mapping(model, add_legacy=False))


def _tied_names(model: torch.nn.Module) -> list[str]:
    names = []
    for prefix, module in model.named_modules():
        tied = getattr(module, "_tied_weights_keys", None) or ()
        names.extend(f"{prefix}.{key}" if prefix else key for key in tied)
    return names


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _raise_on_every_rank(error: BaseException | None, device: torch.device) -> None:
    """Raises `error` here, and a RuntimeError on every other process, when any process failed."""
    failed = error is not None
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flag = torch.tensor([float(failed)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        failed = bool(flag.item())
    if error is not None:
        raise error
    if failed:
        raise RuntimeError("writing the Hugging Face checkpoint failed on the writing process")
