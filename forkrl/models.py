"""Load any Hugging Face causal LM and tokenizer; build tiny ones locally for tests and the demo.

Loading is always the real ``from_pretrained`` path, safetensors only; a tiny model is built from a
config, saved with ``save_pretrained`` and loaded back through that same path, so tests exercise it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterable

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

EOS, PAD = "<|endoftext|>", "<|pad|>"


class ModelLoadError(ValueError):
    """A model or tokenizer could not be loaded; the message says which and what to do."""


def build_tokenizer(texts: Iterable[str], vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on ``texts`` in well under a second, digits kept one per token.

    One digit per token matters for arithmetic: merged digit strings would hide the carries.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)


def tiny_config(arch: str, vocab_size: int, *, hidden_size: int, num_layers: int, num_heads: int,
                num_kv_heads: int, intermediate_size: int, max_positions: int, eos_id: int, pad_id: int):
    """A Llama- or Qwen2-architecture config of the given size (tied embeddings)."""
    from transformers import LlamaConfig, Qwen2Config

    cls = {"qwen2": Qwen2Config, "llama": LlamaConfig}[arch]
    return cls(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
               num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
               max_position_embeddings=max_positions, tie_word_embeddings=True, eos_token_id=eos_id,
               pad_token_id=pad_id, bos_token_id=eos_id, rms_norm_eps=1e-6)


def build_tiny(out_dir: Path, texts: list[str], *, arch: str, vocab_size: int, seed: int, **size) -> Path:
    """Train a tokenizer on ``texts``, initialise a tiny model, save both to ``out_dir``."""
    tokenizer = build_tokenizer(texts, vocab_size)
    config = tiny_config(arch, len(tokenizer), eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, **size)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")  # checkpoint.remove_stale_temps's pattern
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if out_dir.exists():  # another process built the same spec first; theirs is as good as ours
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, out_dir)
    return out_dir


def spec_hash(spec: dict, texts: list[str]) -> str:
    h = hashlib.sha256(json.dumps(spec, sort_keys=True).encode())
    for t in texts:
        h.update(t.encode())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    """Where built tiny models are cached: $FORKRL_CACHE, else $XDG_CACHE_HOME/forkrl, else ~/.cache/forkrl."""
    if os.environ.get("FORKRL_CACHE"):
        return Path(os.environ["FORKRL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "forkrl"


def check_source(path: str) -> None:
    local = Path(path).expanduser()
    if local.exists():
        if not (local / "config.json").exists():
            raise ModelLoadError(f"model.path {path!r} exists but has no config.json: point it at a directory "
                                 "written by save_pretrained (a run's <stage>/final directory works)")
        return
    looks_like_hub_id = path.count("/") <= 1 and not path.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise ModelLoadError(f"model.path {path!r} does not exist; give a local model directory or a hub id")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ModelLoadError(f"model.path {path!r} is not a local directory and HF_HUB_OFFLINE=1 forbids the hub; "
                             "download it where the network allows and give the local path")


def load_error(what: str, path: str, e: Exception) -> ModelLoadError:
    """The error for a model or tokenizer that did not load: the damaged file when one is found
    (``userfiles.damaged_model_file``), else what the loader said."""
    from .userfiles import damaged_model_file

    local = Path(path).expanduser()
    damaged = damaged_model_file(local) if local.is_dir() else None
    if damaged:
        return ModelLoadError(f"could not load {what} from {path!r}: {damaged}. Restore the file (copy the "
                              "directory again, or save the model again with save_pretrained)")
    return ModelLoadError(f"could not load {what} from {path!r}: {type(e).__name__}: {str(e)[:500]}")


def load_tokenizer(path: str, *, trust_remote_code: bool = False):
    check_source(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - JSON, UTF-8 and the tokenizers library's own errors alike
        raise load_error("the tokenizer", path, e) from None
    if tokenizer.eos_token_id is None:
        raise ModelLoadError(f"the tokenizer at {path!r} has no EOS token; sampling could never stop. "
                             "Set tokenizer.eos_token and save it again")
    if tokenizer.pad_token_id is None:  # common for base models; EOS is the usual stand-in
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str, *, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    check_source(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True,
                                                     trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - safetensors' SafetensorError is neither OSError nor ValueError
        raise load_error("a causal LM", path, e) from None
    return model
