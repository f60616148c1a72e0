"""Command-line pieces shared by the CLOC-LLaVA benchmark subcommands (``regions``, ``refcoco``, ``reg``,
``flickr30k``, ``ferret-bench``): the model and decoding arguments, and loading the model and processor with errors
a user can act on. Loading also joins a ``torchrun`` / ``accelerate launch`` run (:mod:`eval.distributed`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers.utils.logging import disable_progress_bar

from eval.distributed import launch_context
from mllm import CLOCLlavaForConditionalGeneration, CLOCLlavaProcessor
from mllm.defaults import DEFAULT_CHECKPOINT
from mllm.loading import load_pretrained_model
from train.checkpoint import resolve_model_folder

DTYPE_NAMES = ("bfloat16", "float16", "float32")


class SetupError(ValueError):
    """A missing or unreadable model, data file or flag value (the command exits with status 2)."""


def add_model_arguments(parser: argparse.ArgumentParser, batch_size: int = 16, max_new_tokens: int = 32) -> None:
    """``--model``, ``--out``, decoding and device flags."""
    parser.add_argument(
        "--model",
        type=Path,
        default=Path(DEFAULT_CHECKPOINT),
        help=f"CLOC-LLaVA folder, or a stage-2 run (its latest checkpoint); default {DEFAULT_CHECKPOINT}, the "
        "quickstart's model",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder (predictions, metrics.json/.md)")
    parser.add_argument(
        "--batch-size", type=int, default=batch_size, help=f"questions per generate call (default {batch_size})"
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=max_new_tokens, help=f"answer length limit (default {max_new_tokens})"
    )
    parser.add_argument(
        "--device", default=None, help="torch device (default: cuda if available, else cpu; launched: cuda:LOCAL_RANK)"
    )
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="float32", help="model dtype (default float32)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def check_positive(args: argparse.Namespace, *names: str) -> None:
    """Raise :class:`SetupError` when one of the named integer flags is below 1 (``None`` is allowed)."""
    bad = [n for n in names if getattr(args, n) is not None and getattr(args, n) < 1]
    if bad:
        raise SetupError(", ".join("--" + n.replace("_", "-") for n in bad) + " must be positive")


def load_model(args: argparse.Namespace) -> tuple[CLOCLlavaForConditionalGeneration, CLOCLlavaProcessor]:
    """The model and processor of ``args.model`` (resolved to a run's latest checkpoint; sets ``args.model``),
    moved to ``args.device``. Under ``torchrun`` / ``accelerate launch`` this first starts the process group (kept in
    ``args.launch``, closed by :func:`eval.cli.main`) and moves the model to this rank's device."""
    try:
        args.launch = launch_context(args.device)
    except ValueError as error:
        raise SetupError(str(error)) from error
    if args.launch.rank != 0:
        disable_progress_bar()  # transformers' loading bars: only rank 0 shows progress
    args.model = resolve_model_folder(args.model)
    if not args.model.is_dir():
        raise SetupError(f"--model {args.model}: not a folder")
    try:
        model = load_pretrained_model(args.model, dtype=getattr(torch, args.dtype), local_files_only=True)
        processor = CLOCLlavaProcessor.from_pretrained(args.model, local_files_only=True)
    except (OSError, ValueError) as error:
        raise SetupError(f"could not load a CLOC-LLaVA model and processor from {args.model}: {error}") from error
    model.to(args.launch.device)
    return model, processor


def report_error(message: str) -> int:
    """Print ``error: message`` to stderr; returns exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    return 2


__all__ = ["DTYPE_NAMES", "SetupError", "add_model_arguments", "check_positive", "load_model", "report_error"]
