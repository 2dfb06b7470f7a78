"""Models for the executor: the bundled SmolLM2 loader, tiny test models, the executor wrapper."""

from relaykv.model.config import (
    SUPPORTED_ARCHITECTURES,
    UnsupportedModelError,
    model_config_from_hf,
)
from relaykv.model.executor import Executor, ForwardResult, KvCache, KvObservation, greedy_generate
from relaykv.model.loader import (
    LoadedModel,
    ModelFileMissingError,
    find_smollm2_gguf,
    load_gguf,
    load_smollm2,
)
from relaykv.model.tiny import TINY_ARCHITECTURES, tiny_config, tiny_model

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "TINY_ARCHITECTURES",
    "Executor",
    "ForwardResult",
    "KvCache",
    "KvObservation",
    "LoadedModel",
    "ModelFileMissingError",
    "UnsupportedModelError",
    "find_smollm2_gguf",
    "greedy_generate",
    "load_gguf",
    "load_smollm2",
    "model_config_from_hf",
    "tiny_config",
    "tiny_model",
]
