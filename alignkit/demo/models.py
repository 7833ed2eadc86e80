"""The demo's models: a character-level tokenizer made with the ``tokenizers`` library and a
Llama-style causal LM from a config (no downloads), both saved and reloaded through the real
``from_pretrained`` path; a pretrained model from a folder or a hub id (``--model``); and the
checks of ``--model`` / ``--device`` that turn bad input into one clear ValueError. The tests use
the tiny models too."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch

PAD, EOS = "<pad>", "<eos>"
DEFAULT_CHARS = "0123456789abcdefghijklmnopqrstuvwxyz +-*=?.,:;()"


def char_tokenizer(chars: str = DEFAULT_CHARS):
    """A ``PreTrainedTokenizerFast`` with one token per character of ``chars`` plus <pad> (id 0) and
    <eos> (id 1); decoding joins characters back exactly."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    if len(set(chars)) != len(chars):
        raise ValueError(f"chars must not repeat a character, got {chars!r}")
    vocab = {PAD: 0, EOS: 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS)


def tiny_llama(
    vocab_size: int,
    *,
    hidden_size: int = 128,
    intermediate_size: int = 512,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    max_position_embeddings: int = 256,
    seed: int = 0,
):
    """A random-init ``LlamaForCausalLM`` (eos id 1, pad id 0, eager attention) from a config."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_attention_heads, max_position_embeddings=max_position_embeddings,
        eos_token_id=1, pad_token_id=0, bos_token_id=None, tie_word_embeddings=False,
    )  # fmt: skip
    config._attn_implementation = "eager"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return transformers.AutoModelForCausalLM.from_config(config)


def save_and_reload(model, tokenizer, path: str | os.PathLike):
    """Save both to ``path`` and load them back with ``from_pretrained`` (the path a user's own
    checkpoint takes)."""
    import transformers

    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    return model, transformers.AutoTokenizer.from_pretrained(path)


@contextlib.contextmanager
def transformers_bars_off() -> Iterator[None]:
    """No transformers progress bars (weight loading / shard writing) inside the block: the demo's
    own bars say what runs."""
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def resolve_device(device: str):
    """``device`` ("cpu", "cuda", "cuda:1", "auto": CUDA when present) as a ``torch.device``, or
    ValueError saying why it cannot be used here."""
    if not isinstance(device, str):
        raise TypeError(f"device must be a string such as 'cpu' or 'cuda', got {type(device).__name__}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {device!r}") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device={device!r} but this machine has no usable CUDA device (torch {torch.__version__}, "
                f"built with CUDA {torch.version.cuda or 'none'}); use --device cpu"
            )
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(
                f"device={device!r} but only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
    elif resolved.type != "cpu":
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {device!r}")
    return resolved


def looks_like_local_path(name: str) -> bool:
    """Whether ``name`` can only mean a folder (a hub id is ``name`` or ``owner/name``)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name or name.endswith("/")


def check_model_name(name: str) -> None:
    """ValueError when ``name`` is meant as a local folder that does not exist or holds no model."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"model must be a folder or a hub id, got {name!r}")
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ValueError(f"model {name!r} is not a saved model folder (no config.json in it)")
    elif looks_like_local_path(name):
        raise ValueError(f"model {name!r}: no such folder")


def load_pretrained(name: str, *, device):
    """(model, tokenizer) from a folder or a hub id through ``from_pretrained``, the model on ``device``
    in eval mode; a tokenizer without a pad token gets its eos as pad. ValueError, with transformers'
    reason, when either cannot be loaded (a hub id where the network is unreachable, for one)."""
    import transformers

    check_model_name(name)
    source = str(Path(name).expanduser()) if Path(name).expanduser().exists() else name
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source)
        model = transformers.AutoModelForCausalLM.from_pretrained(source)
    except (OSError, ValueError, KeyError) as exc:
        where = "the folder" if Path(source).exists() else "the hub (no local folder of that name)"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"could not load model {name!r} from {where}: {reason}") from exc
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer
