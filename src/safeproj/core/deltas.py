"""Weight deltas Δ = tuned − base, read one tensor at a time.

A DeltaSource names the tensors it covers and yields (name, Δ) pairs as float32 CPU tensors, so a
whole model delta never sits in memory. Tensor names are the plain Hugging Face names
(`model.layers.0.self_attn.q_proj.weight`). By default only the attention and MLP projection
matrices of the decoder blocks are selected; embeddings, lm_head, norms and biases are opt-in
through `include`, whose entries are regexes or named tensor sets (`TENSOR_SETS`: `@default`, and
`@paper`, every tensor the checkpoints store, as the authors' code projects). Downstream, a 1-D tensor of length m is treated as the m×1 matrix (its
subspace is the span of the vector). Deltas keep the stored layout: GPT-2's Conv1D weights are
(in, out), so their "left" side is the input space.

Sources: two checkpoints (CheckpointDelta), a PEFT adapter (LoraDelta), two in-memory mappings
(TensorDelta) and a training run against its start (RunDelta). They stay in one module, a little over
400 lines, because they share DeltaSource's contract and `delta_from_spec` chooses among them.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from safeproj.core.names import BLOCK
from safeproj.core.spectrum import all_finite
from safeproj.core.tensor_files import SafetensorsFiles, sha256_file

DEFAULT_INCLUDE = (
    # Llama/Mistral/Qwen/OPT (q,k,v,o; out_proj), Phi-3 (qkv_proj), GPT-2 (c_attn, c_proj), NeoX/Falcon.
    BLOCK + r"(?:self_attn|attn|attention|self_attention)\."
    r"(?:q_proj|k_proj|v_proj|o_proj|out_proj|qkv_proj|c_attn|c_proj|query_key_value|dense)\.weight$",
    BLOCK + r"(?:mlp\.)?"
    r"(?:gate_proj|up_proj|down_proj|gate_up_proj|c_fc|c_proj|dense_h_to_4h|dense_4h_to_h|fc1|fc2)\.weight$",
)


# Named tensor sets, usable as entries of `include` (`@name`). `@paper`: every stored tensor, embeddings
# and 1-D tensors (norms, biases) included; a 1-D tensor's subspace is that of its m×1 column.
TENSOR_SETS: dict[str, tuple[str, ...]] = {"default": DEFAULT_INCLUDE, "paper": (r".",)}


def _expand_sets(patterns: Iterable[str], what: str) -> list[str]:
    expanded = []
    for p in patterns:
        if isinstance(p, str) and p.startswith("@"):
            if p[1:] not in TENSOR_SETS:
                known = ", ".join(f"@{name}" for name in TENSOR_SETS)
                raise ValueError(f"unknown tensor set {p!r} in {what}; known: {known}")
            expanded += TENSOR_SETS[p[1:]]
        else:
            expanded.append(p)
    return expanded


def _patterns(patterns: str | Iterable[str] | None, what: str) -> list[re.Pattern]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    compiled = []
    for p in _expand_sets(patterns, what):
        try:
            compiled.append(re.compile(p))
        except re.error as err:
            raise ValueError(f"invalid {what} regex {p!r}: {err}") from None
    return compiled


def select_names(
    names: Iterable[str],
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
) -> list[str]:
    """Names matching any `include` regex or tensor set (re.search; None → DEFAULT_INCLUDE) and no `exclude`
    regex, in order."""
    inc = _patterns(DEFAULT_INCLUDE if include is None else include, "include")
    exc = _patterns(exclude, "exclude")
    return [n for n in names if any(p.search(n) for p in inc) and not any(p.search(n) for p in exc)]


def natural_key(name: str) -> list:
    """Sort key putting layer 2 before layer 10 (safetensors headers list names alphabetically)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


class DeltaSource:
    """Base class: subclasses fill `_names`/`_shapes` in __init__ and implement `_compute(name)`."""

    kind = "delta"

    def __init__(self) -> None:
        self._names: list[str] = []
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._description: dict | None = None

    def names(self) -> list[str]:
        return list(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        self._check_name(name)
        return self._shapes[name]

    def get(self, name: str) -> Tensor:
        """Δ for one tensor: float32, CPU, finite."""
        self._check_name(name)
        delta = self._compute(name)
        if not all_finite(delta):
            raise ValueError(f"delta of {name!r} contains NaN or inf")
        return delta

    def __iter__(self) -> Iterator[tuple[str, Tensor]]:
        for name in self._names:
            yield name, self.get(name)

    def describe(self) -> dict:
        """JSON-able provenance: kind, paths and content hashes (computed once)."""
        if self._description is None:
            self._description = self._describe()
        return self._description

    def _check_name(self, name: str) -> None:
        if name not in self._shapes:
            raise ValueError(f"no tensor named {name!r} in this {self.kind} delta")

    def _compute(self, name: str) -> Tensor:
        raise NotImplementedError

    def _describe(self) -> dict:
        raise NotImplementedError

    def _select(self, names: Iterable[str], include, exclude, where: str) -> list[str]:
        selected = select_names(names, include, exclude)
        if not selected:
            raise ValueError(f"no tensors of {where} match include={include!r} exclude={exclude!r}")
        return selected


class CheckpointDelta(DeltaSource):
    """Δ = tuned − base between two safetensors checkpoints (HF dirs, sharded or not, or files).

    Each get() reads one tensor from each side; missing tensors and shape mismatches are caught
    from the headers at construction.
    """

    kind = "checkpoint"

    def __init__(self, tuned: str | Path, base: str | Path, include=None, exclude=None):
        super().__init__()
        self.tuned, self.base = SafetensorsFiles(tuned), SafetensorsFiles(base)
        union = sorted(set(self.tuned.shapes) | set(self.base.shapes), key=natural_key)
        self._names = self._select(union, include, exclude, f"{tuned} and {base}")
        self._stored: dict[str, tuple[str, str]] = {}
        for name in self._names:
            t, b = self.tuned.resolve(name), self.base.resolve(name)
            for stored, side in ((t, tuned), (b, base)):
                if stored is None:
                    raise ValueError(f"tensor {name!r} is missing from {side}")
            if self.tuned.shapes[t] != self.base.shapes[b]:
                raise ValueError(
                    f"tensor {name!r} has shape {self.tuned.shapes[t]} in {tuned} but {self.base.shapes[b]} in {base}"
                )
            self._stored[name] = (t, b)
            self._shapes[name] = self.tuned.shapes[t]

    def _compute(self, name: str) -> Tensor:
        t, b = self._stored[name]
        tuned, base = self.tuned.read(t), self.base.read(b)  # memory-mapped: no copies yet
        if tuned.dtype == torch.float32:
            # Into fresh memory: writing into the mapped pages would copy them one page fault at a time.
            return torch.sub(tuned, base.float())
        return tuned.float().sub_(base.float())  # .float() copies, so at most three copies at once

    def _describe(self) -> dict:
        files = self.tuned.files(t for t, _ in self._stored.values()) + self.base.files(
            b for _, b in self._stored.values()
        )
        return {
            "kind": self.kind,
            "tuned": str(self.tuned.path),
            "base": str(self.base.path),
            "files": {str(f): sha256_file(f) for f in dict.fromkeys(files)},
        }


_LORA_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\."
    r"(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|lora_embedding_B)$"
)


def _pattern_value(patterns: Mapping[str, float], module: str, default: float) -> float:
    """PEFT's rank/alpha pattern lookup: first key matching the end of the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


class LoraDelta(DeltaSource):
    """ΔW = scaling·B·A of a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors).

    scaling = lora_alpha/r, or lora_alpha/√r with use_rslora; alpha_pattern is honoured and r is
    read from the factor shapes (so rank_pattern needs no lookup). Names are the base model's:
    `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` → `model.layers.0.self_attn.q_proj.weight`.
    Embedding adapters give ΔW = scaling·(B·A)ᵀ, fan_in_fan_out (GPT-2 Conv1D) a transposed ΔW,
    and lora_bias a `.bias` delta of scaling·b.
    """

    kind = "lora"

    def __init__(self, adapter: str | Path, include=None, exclude=None):
        super().__init__()
        self.adapter = Path(adapter)
        self.config_path = self.adapter / "adapter_config.json"
        self.weights_path = self.adapter / "adapter_model.safetensors"
        if not self.config_path.is_file():
            raise ValueError(f"{self.adapter} is not a PEFT adapter (no adapter_config.json)")
        if not self.weights_path.is_file():
            raise ValueError(f"{self.adapter} has no adapter_model.safetensors (pickled adapters are not read)")
        try:
            cfg = json.loads(self.config_path.read_text())
        except ValueError as err:
            raise ValueError(f"unreadable {self.config_path}: {err}") from None
        if cfg.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"{self.adapter} is a {cfg.get('peft_type')} adapter; only LORA is supported")
        if cfg.get("use_dora"):
            raise ValueError(
                f"{self.adapter} is a DoRA adapter: its update is not B·A; merge it and use CheckpointDelta"
            )
        self.config = cfg
        self.fan_in_fan_out = bool(cfg.get("fan_in_fan_out", False))
        self.use_rslora = bool(cfg.get("use_rslora", False))
        alpha_pattern = cfg.get("alpha_pattern") or {}

        # module → part → (stored key, shape)
        modules: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {}
        try:
            with safe_open(str(self.weights_path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    if key.endswith(".base_layer.weight"):
                        continue  # a copy of the base weight saved beside embedding adapters
                    match = _LORA_KEY.match(key)
                    if match is None:
                        raise ValueError(
                            f"adapter tensor {key!r} is not a LoRA factor (modules_to_save and other adapter "
                            "tensors are not deltas: merge the adapter and use CheckpointDelta)"
                        )
                    shape = tuple(f.get_slice(key).get_shape())
                    modules.setdefault(match["module"], {})[match["part"]] = (key, shape)
        except ValueError:
            raise
        except Exception as err:
            raise ValueError(f"cannot read {self.weights_path}: {err}") from None

        # base-model tensor name → (kind, {part: stored key}, scaling)
        self._factors: dict[str, tuple[str, dict[str, str], float]] = {}
        candidates: dict[str, tuple[int, ...]] = {}
        for module, parts in modules.items():
            embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
            a_part, b_part = (
                ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
            )
            if a_part not in parts or b_part not in parts:
                raise ValueError(f"adapter module {module!r} lacks {a_part if a_part not in parts else b_part}")
            a_shape, b_shape = parts[a_part][1], parts[b_part][1]
            if len(a_shape) != 2 or len(b_shape) != 2 or b_shape[1] != a_shape[0]:
                raise ValueError(f"adapter module {module!r} has mismatched factors A{a_shape} and B{b_shape}")
            r = a_shape[0]
            alpha = _pattern_value(alpha_pattern, module, cfg.get("lora_alpha", 8))
            scaling = alpha / math.sqrt(r) if self.use_rslora else alpha / r
            keys = {part: key for part, (key, _) in parts.items()}
            out_in = (b_shape[0], a_shape[1])
            transposed = embedding or self.fan_in_fan_out  # ΔW stored as (in, out)
            candidates[f"{module}.weight"] = out_in[::-1] if transposed else out_in
            self._factors[f"{module}.weight"] = ("embedding" if embedding else "linear", keys, scaling)
            if "lora_B.bias" in parts:
                candidates[f"{module}.bias"] = parts["lora_B.bias"][1]
                self._factors[f"{module}.bias"] = ("bias", keys, scaling)
        self._names = self._select(sorted(candidates, key=natural_key), include, exclude, str(self.adapter))
        self._shapes = {n: candidates[n] for n in self._names}

    def _compute(self, name: str) -> Tensor:
        kind, keys, scaling = self._factors[name]
        with safe_open(str(self.weights_path), framework="pt", device="cpu") as f:
            if kind == "bias":
                return f.get_tensor(keys["lora_B.bias"]).float() * scaling
            if kind == "embedding":
                A, B = f.get_tensor(keys["lora_embedding_A"]).float(), f.get_tensor(keys["lora_embedding_B"]).float()
                return (B @ A).T.contiguous() * scaling
            A, B = f.get_tensor(keys["lora_A.weight"]).float(), f.get_tensor(keys["lora_B.weight"]).float()
        delta = (B @ A) * scaling
        return delta.T.contiguous() if self.fan_in_fan_out else delta

    def _describe(self) -> dict:
        return {
            "kind": self.kind,
            "adapter": str(self.adapter),
            "r": self.config.get("r"),
            "lora_alpha": self.config.get("lora_alpha"),
            "use_rslora": self.use_rslora,
            "files": {str(p): sha256_file(p) for p in (self.config_path, self.weights_path)},
        }


def _tensor_bytes(t: Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


class TensorDelta(DeltaSource):
    """Δ = end − start between two in-memory mappings of name → tensor (e.g. state dicts)."""

    kind = "tensors"

    def __init__(self, end: Mapping[str, Tensor], start: Mapping[str, Tensor], include=None, exclude=None):
        super().__init__()
        self.end, self.start = end, start
        self._names = self._select(list(end), include, exclude, "the end tensors")
        for name in self._names:
            if name not in start:
                raise ValueError(f"tensor {name!r} is missing from the start tensors")
            if tuple(end[name].shape) != tuple(start[name].shape):
                raise ValueError(
                    f"tensor {name!r} has shape {tuple(end[name].shape)} at the end "
                    f"but {tuple(start[name].shape)} at the start"
                )
            self._shapes[name] = tuple(end[name].shape)

    def _compute(self, name: str) -> Tensor:
        return self.end[name].detach().float().cpu() - self.start[name].detach().float().cpu()

    def _describe(self) -> dict:
        digest = hashlib.sha256()
        for name in self._names:
            digest.update(name.encode())
            for t in (self.end[name], self.start[name]):
                digest.update(str((tuple(t.shape), str(t.dtype))).encode())
                digest.update(_tensor_bytes(t))
        return {"kind": self.kind, "n_tensors": len(self._names), "sha256": digest.hexdigest()}


class RunDelta(DeltaSource):
    """The update of a training run, W_now − W_start, one tensor at a time (`get`: float32 on CPU).

    Made when training starts, over the run's weights (`core.targets.Target`s: plain parameters or
    LoRA pairs). A plain weight's start is read from `start_dir`, the run's starting weights on disk
    (SafeprojLM's `base_dir`), whenever that folder holds the tensor with the same shape; otherwise it
    is copied to CPU here. A LoRA pair's update is the change of its merged weight, s·B·A − s·B₀·A₀:
    its start factors are copied (r·(m+n) values), or, with `fresh_adapters`, taken as B₀ = 0 (PEFT
    starts B at zero), which needs no copy. `held` holds every copy: what a checkpoint must keep for a
    resumed run to measure from the same start, given back through the `held` argument.
    """

    kind = "run"

    def __init__(
        self,
        targets: Iterable,
        start_dir: str | Path | None = None,
        held: Mapping[str, Tensor] | None = None,
        fresh_adapters: bool = False,
    ) -> None:
        super().__init__()
        self.targets = {t.name: t for t in targets}
        self.start_dir = start_dir
        self._files = _start_files(start_dir)
        self._stored: dict[str, str] = {}  # name -> stored name in start_dir
        self.held: dict[str, Tensor] = {}
        restored = held or {}
        for name, t in self.targets.items():
            if t.is_lora:
                self._shapes[name] = (t.lora_b.shape[0], t.lora_a.shape[1])
                for key, factor in () if fresh_adapters else ((f"{name}::B", t.lora_b), (f"{name}::A", t.lora_a)):
                    self.held[key] = restored[key] if key in restored else factor.detach().to("cpu", copy=True)
                continue
            self._shapes[name] = tuple(t.weight.shape)
            stored = self._files.resolve(name) if self._files else None
            if stored is not None and self._files.shapes[stored] == self._shapes[name]:
                self._stored[name] = stored
            else:
                self.held[name] = restored[name] if name in restored else t.weight.detach().to("cpu", copy=True)
        self._names = list(self.targets)

    @property
    def on_disk(self) -> list[str]:
        """The plain weights whose start is read from `start_dir`."""
        return list(self._stored)

    def start(self, name: str) -> Tensor:
        """W_start of a plain weight, on CPU in its stored dtype."""
        self._check_name(name)
        return self.held[name] if name in self.held else self._files.read(self._stored[name])

    @torch.no_grad()
    def update(self, name: str, now: Tensor | None = None) -> Tensor:
        """ΔW in float32 on the weight's device; `now` stands in for a plain weight's current value."""
        t = self.targets[name]
        if t.is_lora:
            delta = t.delta_weight()
            if f"{name}::B" in self.held:
                b0, a0 = (self.held[f"{name}::{part}"].to(delta.device).float() for part in "BA")
                delta -= t.scaling * (b0 @ a0)
            return delta
        weight = (t.weight if now is None else now).detach()
        return weight.float() - self.start(name).to(weight.device).float()

    def _compute(self, name: str) -> Tensor:
        return self.update(name).cpu()

    def _describe(self) -> dict:
        return {"kind": self.kind, "start_dir": str(self.start_dir), "tensors": len(self._names)}


def _start_files(directory: str | Path | None) -> SafetensorsFiles | None:
    """The safetensors of a run's start folder, or None where there is none to read."""
    if not directory:
        return None
    try:
        return SafetensorsFiles(directory)
    except (OSError, ValueError):
        return None  # e.g. an adapter folder: every start is then copied


def _run_checkpoint(path: Path) -> Path | None:
    """The checkpoint dir of a finished run (safeproj.json beside the weights), or None."""
    for candidate in (path, path / "checkpoint"):
        if (candidate / "safeproj.json").is_file():
            return candidate
    return None


def delta_from_spec(spec: str, include=None, exclude=None) -> DeltaSource:
    """A delta from a string: "TUNED,BASE", a PEFT adapter dir, or a finished run (its update)."""
    if "," in spec:
        parts = [p.strip() for p in spec.split(",")]
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"delta spec {spec!r}: expected 'TUNED,BASE' with two paths")
        return CheckpointDelta(parts[0], parts[1], include, exclude)
    path = Path(spec)
    run = _run_checkpoint(path) if path.is_dir() else None
    if run is not None:
        try:
            info = json.loads((run / "safeproj.json").read_text())
        except ValueError as err:
            raise ValueError(f"unreadable {run / 'safeproj.json'}: {err}") from None
        if info.get("lora"):
            return LoraDelta(run, include, exclude)
        base = info.get("base")
        if not base:
            raise ValueError(f"{run / 'safeproj.json'} names no 'base' weights")
        base_path = Path(base) if Path(base).exists() else run / base
        if not base_path.exists():
            raise ValueError(f"run {spec!r} starts from {base!r}, which is not a local checkpoint")
        return CheckpointDelta(run, base_path, include, exclude)
    if path.is_dir() and (path / "adapter_config.json").is_file():
        return LoraDelta(path, include, exclude)
    raise ValueError(
        f"cannot read a delta from {spec!r}: expected 'TUNED,BASE', a PEFT adapter directory "
        "or a finished run directory (with safeproj.json)"
    )
