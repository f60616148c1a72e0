"""Training-step speed: CLOC-LLaVA against transformers' ``LlavaForConditionalGeneration`` at identical sizes.

Both models come from ``bench.generate.build_pair`` (a random llava-hf model and its conversion, same weights). A
step is forward with labels + backward + AdamW update on a batch of image + text sequences; each round runs one step
of each model in turn; the median over rounds is reported with the ratio ours / transformers' (target ≤ 1.1).

    python -m bench.train_step               # batch 8, 3.5M parameters
    python -m bench.train_step --quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence

import torch

from bench.generate import build_pair, make_inputs


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> float:
    start = time.perf_counter()
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def run(batch_size: int = 8, rounds: int = 10, quick: bool = False) -> dict[str, float]:
    """Median seconds per training step of each model and their ratio."""
    text_layers, text_width = (2, 64) if quick else (4, 256)
    rounds = 3 if quick else rounds
    reference, ours = build_pair(text_layers, text_width)
    batch = make_inputs(reference.config, batch_size, 48, seed=0)
    labels = batch["input_ids"].clone()
    labels[labels == reference.config.image_token_id] = -100
    batch["labels"] = labels
    with torch.no_grad():  # same function before training: equal losses
        losses = reference(**batch).loss.item(), ours(**batch).loss.item()
    if abs(losses[0] - losses[1]) > 1e-4:
        raise AssertionError(f"losses differ before training: {losses}")
    times: dict[str, list[float]] = {"transformers": [], "ours": []}
    optimizers = {
        name: torch.optim.AdamW(model.parameters(), lr=1e-5)
        for name, model in (("transformers", reference.train()), ("ours", ours.train()))
    }
    for round_index in range(rounds + 1):  # the first round warms up
        for name, model in (("transformers", reference), ("ours", ours)):
            elapsed = _step(model, optimizers[name], batch)
            if round_index:
                times[name].append(elapsed)
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        "transformers_s": medians["transformers"],
        "ours_s": medians["ours"],
        "ratio_ours_vs_transformers": medians["ours"] / medians["transformers"],
        "batch_size": batch_size,
        "rounds": rounds,
        "parameters_m": sum(p.numel() for p in ours.parameters()) / 1e6,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    result = run(args.batch_size, args.rounds, args.quick)
    print(
        f"{result['parameters_m']:.1f}M parameters, batch {result['batch_size']}, fp32, CPU "
        f"({torch.get_num_threads()} threads), median of {result['rounds']} rounds\n"
    )
    print("| model | seconds / step |")
    print("| --- | ---: |")
    print(f"| LlavaForConditionalGeneration | {result['transformers_s']:.4f} |")
    print(f"| CLOC-LLaVA | {result['ours_s']:.4f} |")
    print(f"\nours / transformers: {result['ratio_ours_vs_transformers']:.3f}x (target <= 1.1)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
