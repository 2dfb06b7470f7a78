"""relaykv: reuse another LLM instance's decoding KV cache at any position.

The C++ core lives in the extension module ``relaykv._relaykv``; this package
adds the model loader, the reference engine, the vLLM connector and the CLI.
"""

from __future__ import annotations

__version__ = "0.1.0"

try:
    # torch first: when the core is built with the executor it links libtorch,
    # and importing torch loads those libraries into the process.
    import torch  # noqa: F401
except ImportError:  # pragma: no cover - the core without the executor needs no torch
    pass

try:
    from relaykv import _relaykv as core
except ImportError as exc:  # pragma: no cover - exercised only on a broken checkout
    raise ImportError(
        "relaykv's C++ core (relaykv._relaykv) is not built or does not load: "
        f"{exc}. Run 'make build' in the source checkout, or 'pip install .'."
    ) from exc

RelayKVError = core.RelayKVError
KvLayout = core.KvLayout
RopeParams = core.RopeParams

__all__ = ["core", "RelayKVError", "KvLayout", "RopeParams", "__version__"]
