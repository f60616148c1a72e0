"""Command-line pieces shared by the CLOC-LLaVA benchmark subcommands (``regions``, ``refcoco``, ``reg``,
``flickr30k``, ``ferret-bench``): the model and decoding arguments, and loading the model and processor with errors
a user can act on. Loading also joins a ``torchrun`` / ``accelerate launch`` run (:mod:`eval.distributed`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers.utils.logging import disable_progress_bar

from cloc_encoder.run_folder import resolve_model_folder
from eval.distributed import launch_context
from eval.mllm_generation import DEFAULT_MAX_FAILED_FRACTION, GenerationSettings
from mllm import CLOCLlavaForConditionalGeneration, CLOCLlavaProcessor
from mllm.defaults import DEFAULT_CHECKPOINT
from mllm.loading import ATTN_IMPLEMENTATIONS, load_pretrained_model, resolve_attn_implementation

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
    parser.add_argument(
        "--attn-implementation",
        choices=(*ATTN_IMPLEMENTATIONS, "auto"),
        default="sdpa",
        help="attention kernels (default sdpa; auto: flash_attention_2 when installed on a GPU)",
    )
    parser.add_argument(
        "--max-failed-fraction",
        type=float,
        default=DEFAULT_MAX_FAILED_FRACTION,
        help="stop when more than this fraction of the questions cannot be answered (unreadable images); failed "
        f"answers are asked again on the next run (default {DEFAULT_MAX_FAILED_FRACTION:g})",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def check_positive(args: argparse.Namespace, *names: str) -> None:
    """Raise :class:`SetupError` when one of the named integer flags is below 1 (``None`` is allowed)."""
    bad = [n for n in names if getattr(args, n) is not None and getattr(args, n) < 1]
    if bad:
        raise SetupError(", ".join("--" + n.replace("_", "-") for n in bad) + " must be positive")


def generation_settings(args: argparse.Namespace) -> GenerationSettings:
    """The :class:`~eval.mllm_generation.GenerationSettings` of the flags (``--max-new-tokens``, ``--batch-size``,
    ``--max-failed-fraction``); raises :class:`SetupError` on a fraction outside [0, 1]."""
    if not 0.0 <= args.max_failed_fraction <= 1.0:
        raise SetupError(f"--max-failed-fraction {args.max_failed_fraction:g}: must be between 0 and 1")
    return GenerationSettings(
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        max_failed_fraction=args.max_failed_fraction,
    )


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
        attention = resolve_attn_implementation(args.attn_implementation)
    except (ImportError, RuntimeError, ValueError) as error:
        raise SetupError(f"--attn-implementation {args.attn_implementation}: {error}") from error
    try:
        model = load_pretrained_model(
            args.model, attn_implementation=attention, dtype=getattr(torch, args.dtype), local_files_only=True
        )
        processor = CLOCLlavaProcessor.from_pretrained(args.model, local_files_only=True)
    except (OSError, ValueError) as error:
        raise SetupError(f"could not load a CLOC-LLaVA model and processor from {args.model}: {error}") from error
    model.to(args.launch.device)
    return model, processor


def report_error(message: str, status: int = 2) -> int:
    """Print ``error: message`` to stderr; returns ``status`` (2: setup errors; 1: too many failed answers)."""
    print(f"error: {message}", file=sys.stderr)
    return status


def report_not_evaluated(not_evaluated: int, evaluated: int) -> int:
    """Warn on stderr about the questions not evaluated (failed answers: unreadable images, asked again on the next
    run); returns exit status 1 when no question was evaluated, else 0."""
    if not_evaluated:
        print(
            f"warning: {not_evaluated} questions were not evaluated (image could not be read); they are recorded "
            "as failed and asked again on the next run",
            file=sys.stderr,
        )
    if not_evaluated and not evaluated:
        print("error: no image could be read; nothing was evaluated", file=sys.stderr)
        return 1
    return 0


__all__ = [
    "DTYPE_NAMES",
    "SetupError",
    "add_model_arguments",
    "check_positive",
    "generation_settings",
    "load_model",
    "report_error",
    "report_not_evaluated",
]
