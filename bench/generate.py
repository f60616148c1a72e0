"""Generation speed: CLOC-LLaVA against transformers' ``LlavaForConditionalGeneration`` at identical sizes and weights.

A random llava-hf model is built from configs (``mllm.tiny_llava_hf``), saved, and converted with
``mllm.convert_llava_hf`` (which keeps every weight), so both models compute the same function. Each round times
greedy generation of ``--new-tokens`` tokens (forced with ``min_new_tokens``) for the same image + prompt with both
models in turn; the median of the rounds is reported, with the ratio ours / transformers' (target ≤ 1.05). Then
batch-8 against batch-1 throughput of our model (new tokens per second; target ≥ 3× on CPU).

    python -m bench.generate                 # a ~20M-parameter model, 32 new tokens
    python -m bench.generate --quick         # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, LlavaForConditionalGeneration

import mllm  # noqa: F401  (registers the CLOC-LLaVA Auto classes)
from mllm.convert_llava_hf import convert_llava_hf
from mllm.tiny_llava_hf import save_tiny_llava_hf


def make_inputs(config, batch: int, prompt_tokens: int, seed: int) -> dict[str, torch.Tensor]:
    """``batch`` identical-length prompts: BOS, the image tokens, then random text tokens; one image each."""
    generator = torch.Generator().manual_seed(seed)
    vocab = config.text_config.vocab_size
    image_tokens = torch.full((batch, config.image_seq_length), config.image_token_id)
    text = torch.randint(5, min(vocab, 300), (batch, prompt_tokens), generator=generator)
    bos = torch.full((batch, 1), config.text_config.bos_token_id)
    input_ids = torch.cat([bos, image_tokens, text], dim=1)
    size = config.vision_config.image_size
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": torch.randn(batch, 3, size, size, generator=generator),
    }


def build_pair(text_layers: int, text_width: int) -> tuple[LlavaForConditionalGeneration, torch.nn.Module]:
    """transformers' model and the converted CLOC-LLaVA, same weights (eval mode, fp32, CPU)."""
    with tempfile.TemporaryDirectory() as folder:
        source, converted = Path(folder) / "llava_hf", Path(folder) / "cloc_llava"
        save_tiny_llava_hf(
            source, image_size=64, patch_size=8, vision_layers=4, vision_width=128,
            text_layers=text_layers, text_width=text_width,
        )  # fmt: skip
        convert_llava_hf(source, converted)
        reference = LlavaForConditionalGeneration.from_pretrained(source).eval()
        ours = AutoModelForImageTextToText.from_pretrained(converted).eval()
    return reference, ours


def _timed(generate: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    output = generate()
    return time.perf_counter() - start, output


def run(
    new_tokens: int = 32, rounds: int = 5, text_layers: int = 4, text_width: int = 256, quick: bool = False
) -> dict[str, float]:
    """Build, convert, time. Returns the medians (seconds) and the two ratios."""
    if quick:
        new_tokens, rounds, text_layers, text_width = 8, 2, 2, 64
    reference, ours = build_pair(text_layers, text_width)
    settings = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
    single = make_inputs(reference.config, 1, 16, seed=0)
    batch8 = make_inputs(reference.config, 8, 16, seed=1)
    times: dict[str, list[float]] = {"transformers": [], "ours": [], "ours_batch8": []}
    with torch.inference_mode():
        for round_index in range(rounds + 1):  # the first round warms up
            seconds = {
                "transformers": _timed(lambda: reference.generate(**single, **settings)),
                "ours": _timed(lambda: ours.generate(**single, **settings)),
                "ours_batch8": _timed(lambda: ours.generate(**batch8, **settings)),
            }
            if round_index == 0:
                reference_tokens, our_tokens = seconds["transformers"][1], seconds["ours"][1]
                if not torch.equal(reference_tokens, our_tokens):
                    raise AssertionError("the converted model generated different tokens from transformers' model")
                continue
            for name, (elapsed, _) in seconds.items():
                times[name].append(elapsed)
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        **{f"{name}_s": value for name, value in medians.items()},
        "new_tokens": new_tokens,
        "rounds": rounds,
        "parameters_m": sum(p.numel() for p in ours.parameters()) / 1e6,
        "ratio_ours_vs_transformers": medians["ours"] / medians["transformers"],
        "batch8_vs_batch1_throughput": (8 / medians["ours_batch8"]) / (1 / medians["ours"]),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args.new_tokens, args.rounds, quick=args.quick)
    print(
        f"{result['parameters_m']:.1f}M parameters, {result['new_tokens']} new tokens, greedy, fp32, CPU "
        f"({torch.get_num_threads()} threads), median of {result['rounds']} rounds\n"
    )
    print("| model | batch | seconds | new tokens/s |")
    print("| --- | ---: | ---: | ---: |")
    for name, batch in (("transformers", 1), ("ours", 1), ("ours_batch8", 8)):
        seconds = result[f"{name}_s"]
        label = "LlavaForConditionalGeneration" if name == "transformers" else "CLOC-LLaVA"
        print(f"| {label} | {batch} | {seconds:.3f} | {batch * result['new_tokens'] / seconds:.1f} |")
    print(f"\nours / transformers (batch 1): {result['ratio_ours_vs_transformers']:.3f}x (target <= 1.05)")
    print(f"batch-8 vs batch-1 throughput: {result['batch8_vs_batch1_throughput']:.2f}x (target >= 3)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
