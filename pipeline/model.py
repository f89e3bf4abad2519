"""Base model and tokenizer: built from a preset (`scratch`) or loaded offline from a local path.

`scratch` trains a byte-level BPE tokenizer on the corpus's train split and builds a small
Llama-style causal LM; anything else is loaded with `AutoModelForCausalLM` (no download, no
remote code unless `model.trust_remote_code`). Both are saved in `model/base/` in
`save_pretrained` format, loadable with no Nucleus code.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from pipeline.errors import UserError, did_you_mean
from pipeline.module_spec import Param, module

EOS, PAD = "<|endoftext|>", "<pad>"

# Llama-style presets. Parameter counts include tied input/output embeddings at vocab 4096
# (tiny) / 8192 (small) / 16384 (base); the preset's context length bounds train.block_size.
PRESETS: dict[str, dict] = {
    "tiny": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, max_position_embeddings=512),
    "small": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
                  num_key_value_heads=6, max_position_embeddings=1024),
    "base": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=12, max_position_embeddings=2048),
}

# The catalogue's view (curriculum/modules.py): a scratch preset is a Llama-style model built here
# (plain logits, ReLoRA-able); `hf` is any local Hugging Face causal LM (`model.base: PATH`),
# which provides `plain_logits` only when its config.json names a Llama-style model type.
MODEL_MODULES = (
    *(module("model", size, f"scratch Llama-style preset ({size})",
             (Param("model.vocab_size", "int", 4096, 512, 32768, log=True),),
             provides=("scratch_model", "plain_logits")) for size in PRESETS),
    module("model", "hf", "a local Hugging Face causal LM (model.base: PATH), trained as LoRA adapters"),
)


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on `texts`, as a transformers fast tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS, PAD],
                            show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS,
                                   unk_token=EOS, pad_token=PAD, model_max_length=1_000_000)


def _scratch_config(vocab_size: int, size: str, bos: int | None = None, eos: int | None = None,
                    pad: int | None = None):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
                       tie_word_embeddings=True, rope_theta=10_000.0, **PRESETS[size])


def build_scratch_model(tokenizer, size: str, seed: int = 0) -> nn.Module:
    from transformers import LlamaForCausalLM

    config = _scratch_config(len(tokenizer), size, tokenizer.bos_token_id, tokenizer.eos_token_id,
                             tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def model_skeleton(base: str, size: str, vocab_size: int, trust_remote_code: bool = False) -> nn.Module:
    """The base model's architecture on the meta device (no weights, no tokenizer, no memory):
    enough to check layer names and the context length before anything is trained or written.
    `base` is `scratch` or a local Hugging Face model directory."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

    if base == "scratch":
        with torch.device("meta"):
            return LlamaForCausalLM(_scratch_config(vocab_size, size))
    try:
        config = AutoConfig.from_pretrained(base, local_files_only=True, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as e:  # OSError / ValueError: no config.json, unknown or non-causal model type
        raise UserError(f"model.base: cannot load '{base}' offline as a Hugging Face causal LM "
                        f"({type(e).__name__}: {_first_line(e)}). Give a local directory with "
                        f"config.json and weights, or `scratch`.") from None


def check_target_modules(model: nn.Module, targets: str | list[str]) -> None:
    """Every name in `lora.target_modules` must match a layer LoRA can adapt (peft's rule: the
    module's name, or its dotted suffix; a string is a regex over full names)."""
    import re

    from transformers.pytorch_utils import Conv1D

    if targets == "all-linear":
        return
    kinds = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, Conv1D)
    names = [n for n, m in model.named_modules() if isinstance(m, kinds)]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    if isinstance(targets, str):
        if not any(re.fullmatch(targets, n) for n in names):
            raise UserError(f"lora.target_modules: the pattern '{targets}' matches no layer of the model. "
                            f"Use all-linear or a list of layer names: {', '.join(leaves)}.")
        return
    for t in targets:
        if not any(n == t or n.endswith("." + t) for n in names):
            raise UserError(f"lora.target_modules: '{t}' matches no layer of the model.{did_you_mean(t, leaves)} "
                            f"Its layers: {', '.join(leaves)} (or all-linear).")


def load_pretrained(path: str, trust_remote_code: bool = False, dtype: torch.dtype | None = None):
    """(model, tokenizer) from a local path or cached hub id; a clear error if it is not a causal LM."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as e:  # OSError / ValueError: no config.json, unknown model type, ...
        raise UserError(f"model.base: cannot load '{path}' offline as a Hugging Face model "
                        f"({type(e).__name__}: {_first_line(e)}). Give a local directory with "
                        f"config.json and weights, or `scratch`.") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype,
                                                     trust_remote_code=trust_remote_code)
    except ValueError as e:
        raise UserError(f"model.base: '{path}' is a {type(config).__name__.removesuffix('Config')} "
                        f"model, not a causal language model ({_first_line(e)}).") from None
    except Exception as e:
        raise UserError(f"model.base: cannot load the weights of '{path}' ({type(e).__name__}: "
                        f"{_first_line(e)}).") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True,
                                                  trust_remote_code=trust_remote_code)
    except Exception as e:
        raise UserError(f"model.base: '{path}' has no usable tokenizer ({type(e).__name__}: "
                        f"{_first_line(e)}).") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def context_length(model: nn.Module) -> int:
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if getattr(cfg, key, None):
            return int(getattr(cfg, key))
    return 1_000_000


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else ""


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"train.device: '{device}' asked for, but this machine has no CUDA device. "
                        f"Use train.device: cpu (or auto).")
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"train.device: '{device}' asked for, but this machine has {torch.cuda.device_count()} "
                        f"CUDA device(s) (cuda:0..cuda:{torch.cuda.device_count() - 1}).")
    return dev


def save_base(model: nn.Module, tokenizer, path: Path) -> None:
    """save_pretrained (safetensors) of model and tokenizer into a directory written by rename."""
    from pipeline.atomic import atomic_path

    with atomic_path(path) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
