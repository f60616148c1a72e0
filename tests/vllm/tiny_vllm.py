"""The reference answers of our ``generate`` for the tiny vLLM CLOC-LLaVA (:mod:`bench.vllm_tiny`), which the vLLM
plugin tests compare vLLM's answers with."""

from __future__ import annotations

from pathlib import Path

import torch

from bench.vllm_tiny import ChatCase

MAX_NEW_TOKENS = 16

TWO_TURNS = ChatCase(
    "two_turns",
    (56, 40),
    5,
    "And what is [region0]?",
    [[0.5, 0.4, 0.9, 0.95]],
    history=[("What is [region0]?", [[0.1, 0.1, 0.45, 0.5]], "a red circle")],
)
"""A second turn with a region of its own: with the question before the image (``instruction_first``) the first
turn's region comes before the image and this turn's after it."""


def reference_answers(model_dir: Path, cases: list[ChatCase], max_new_tokens: int = MAX_NEW_TOKENS) -> dict:
    """Our ``generate`` (greedy) for each case, with the prompt ``serve.engine.ChatEngine`` builds: per case the
    prompt text, its exact region boxes, the generated token ids and their text."""
    from mllm import CLOCLlavaForConditionalGeneration, CLOCLlavaProcessor
    from serve.engine import ChatEngine

    model = CLOCLlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = CLOCLlavaProcessor.from_pretrained(model_dir)
    engine = ChatEngine(model, processor)
    tokenizer = processor.tokenizer
    out = {}
    for case in cases:
        prompt, boxes = engine.prompt(case.history, case.message, case.regions)
        inputs = processor(images=[case.image], text=[prompt], boxes=[boxes or None])
        with torch.no_grad():
            generated = model.generate(
                **inputs,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                suppress_tokens=[processor.image_token_id, processor.region_token_id],
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        ids = generated[0, inputs["input_ids"].shape[1] :].tolist()
        out[case.name] = {
            "prompt": prompt,
            "boxes": [list(b) for b in boxes],
            "prompt_token_ids": inputs["input_ids"][0].tolist(),
            "token_ids": ids,
            "text": tokenizer.decode(ids, skip_special_tokens=True),
        }
    return out
