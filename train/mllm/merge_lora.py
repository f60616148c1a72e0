"""Merge a stage-2 LoRA checkpoint into its base and save a plain CLOC-LLaVA folder (safetensors)::

    python -m train.merge_lora --lora runs/stage2/step-001000 --out runs/cloc-llava-merged [--base DIR]
        [--dtype bfloat16]

The LoRA checkpoint holds the PEFT adapter (``adapter_model.safetensors``), the other parameters stage 2 trained
(``non_lora_trainables.safetensors``: projectors, and the prompter / ViT when tuned) and ``lora_info.json`` naming
the base folder the trainer wrote (``output_dir/base_model``, or ``model_path``); ``--base`` overrides it. QLoRA
adapters merge into the full-precision base. The result loads with
``AutoModelForImageTextToText.from_pretrained(out)`` after ``import mllm``, with the tokenizer and processor
(chat template included) copied from the LoRA checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file

from mllm import CLOCLlavaForConditionalGeneration, CLOCLlavaProcessor
from train.mllm.run import NON_LORA_FILE, read_lora_info

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_lora_model(
    lora_dir: str | os.PathLike[str], base_dir: str | os.PathLike[str] | None = None, dtype: torch.dtype | None = None
):
    """The base with the adapter and the non-LoRA trainables applied, as a PEFT model (not merged)."""
    from peft import PeftModel

    lora_dir = Path(lora_dir)
    if not (lora_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{lora_dir}: no adapter_config.json (not a LoRA checkpoint of train.mllm.train)")
    base = base_dir or read_lora_info(lora_dir).get("base_model")
    if not base:
        raise ValueError(f"{lora_dir}: lora_info.json names no base model; pass --base DIR")
    if not (Path(base) / "config.json").is_file():
        raise FileNotFoundError(f"base model folder {base} not found (pass --base DIR)")
    model = CLOCLlavaForConditionalGeneration.from_pretrained(base, dtype=dtype or torch.float32)
    peft_model = PeftModel.from_pretrained(model, str(lora_dir))
    others = lora_dir / NON_LORA_FILE
    if others.is_file():
        state = load_file(str(others))
        missing = [key for key in state if key not in dict(model.named_parameters())]
        if missing:
            raise ValueError(f"{others}: parameters this base does not have: {missing[:5]}")
        with torch.no_grad():
            for key, tensor in state.items():
                parameter = model.get_parameter(key)
                parameter.copy_(tensor.to(parameter.dtype))
    return peft_model.eval()


def merge_lora(
    lora_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    base_dir: str | os.PathLike[str] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Merge and save; returns ``out_dir``."""
    merged = load_lora_model(lora_dir, base_dir, dtype).merge_and_unload()
    out = Path(out_dir)
    merged.save_pretrained(out)
    CLOCLlavaProcessor.from_pretrained(lora_dir).save_pretrained(out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.merge_lora", description="merge LoRA into the base model")
    parser.add_argument("--lora", required=True, type=Path, help="a stage-2 LoRA checkpoint folder (step-NNNNNN)")
    parser.add_argument("--out", required=True, type=Path, help="output folder for the merged model")
    parser.add_argument("--base", type=Path, help="base model folder (default: the one in lora_info.json)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    args = parser.parse_args(argv)
    try:
        out = merge_lora(args.lora, args.out, args.base, DTYPES[args.dtype])
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"merged model written to {out}")
    return 0


__all__ = ["load_lora_model", "main", "merge_lora"]


if __name__ == "__main__":
    sys.exit(main())
