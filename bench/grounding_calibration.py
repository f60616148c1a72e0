"""Issue 12's calibration: a bare tiny LLaVA trained on fresh synthetic scenes, to find what slows grounding down.

No chat template, no referring task, no stage 1, no fixed data set: every step draws ``batch`` new scenes from
:mod:`cloc_encoder.data.synthetic`, asks one grounding question per scene, and trains the vision path and a 4 × 256
Llama from scratch on the answer ``[x1, y1, x2, y2]`` (0–999 grid, original frame). The vision path is either a
CLIP-style ViT trained jointly (``--vision joint``) or a frozen CLOC tower's feature layer (``--vision`` a CLOC
checkpoint folder), optionally with ``--merge`` × ``--merge`` patches per image token as the shipped recipe. Each
evaluation greedily answers ``--eval-scenes`` fresh scenes of another seed: Acc@0.5, mean IoU, and *selection* (the
object the answer overlaps most is the asked one; chance = the mean of 1 / objects).

    python -m bench.grounding_calibration --out runs/calib                              # joint ViT, shape questions
    python -m bench.grounding_calibration --vision runs/cloc_tiny --merge 2 --out runs/calib_cloc
    python -m bench.grounding_calibration --vision runs/cloc_tiny --merge 2 --expressions world --any-shapes ...

``--expressions shape`` with distinct shapes (the default) asks "Where is the <shape>?"; ``world`` asks one of the
world's own referring expressions (colour, size, relations), as the held-out split does.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from cloc_encoder.boxes import box_iou_pairwise
from cloc_encoder.data.synthetic import Scene, SyntheticWorldConfig, build_scene
from cloc_encoder.data.synthetic_language import referring_expressions
from cloc_encoder.image_processing import CLOCImageProcessor
from cloc_encoder.run_folder import resolve_model_folder
from mllm.box_codec import encode_box, parse_first_box
from mllm.modeling_cloc_llava import merge_patch_tokens
from mllm.tokenization import train_chat_tokenizer
from mllm.vision_tower import CLOCVisionTower

ORDERS = ("image_first", "question_first")
EXPRESSIONS = ("shape", "world")


@dataclass
class CalibrationConfig:
    """One calibration run. ``vision``: ``"joint"``, or a CLOC checkpoint or run folder (frozen, feature layer −2)."""

    steps: int = 800
    eval_at: list[int] = field(default_factory=lambda: [400, 800])
    batch_size: int = 48
    lr: float = 3e-4
    warmup_steps: int = 50
    seed: int = 0
    vision: str = "joint"
    merge: int = 1
    order: str = "image_first"
    expressions: str = "shape"
    distinct_shapes: bool = True
    eval_scenes: int = 200
    eval_seed: int = 12345
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4

    def __post_init__(self) -> None:
        if self.order not in ORDERS or self.expressions not in EXPRESSIONS:
            raise ValueError(f"order must be one of {ORDERS} and expressions one of {EXPRESSIONS}")


@dataclass
class Question:
    """A scene, the index of the asked object, and the question's text."""

    scene: Scene
    target: int
    text: str


class SceneQuestions:
    """Fresh scenes and one grounding question each, from a seeded stream."""

    def __init__(self, config: CalibrationConfig, world: SyntheticWorldConfig, seed: int) -> None:
        self.config, self.world, self.rng = config, world, np.random.default_rng(seed)

    def _scene(self) -> Scene:
        while True:
            scene = build_scene(self.world, self.rng)
            shapes = [obj.shape for obj in scene.objects]
            if not self.config.distinct_shapes or len(set(shapes)) == len(shapes):
                return scene

    def draw(self, count: int) -> list[Question]:
        questions = []
        for _ in range(count):
            scene = self._scene()
            target = int(self.rng.integers(len(scene.objects)))
            if self.config.expressions == "shape":
                expression = f"the {scene.objects[target].shape}"
            else:
                options = referring_expressions(scene.objects, self.world.vocabulary, self.world.relation_margin)
                expression = options[target][int(self.rng.integers(len(options[target])))]
            questions.append(Question(scene, target, f"Where is {expression}?"))
        return questions


class TinyGroundingLlava(nn.Module):
    """Vision path (joint ViT or frozen CLOC tower) → MLP projector → a Llama from scratch, fed ``inputs_embeds``."""

    def __init__(self, config: CalibrationConfig, tokenizer: PreTrainedTokenizerBase, image_size: int) -> None:
        super().__init__()
        self.config = config
        if config.vision == "joint":
            self.vision = CLIPVisionModel(
                CLIPVisionConfig(
                    image_size=image_size,
                    patch_size=8,
                    hidden_size=config.hidden_size,
                    intermediate_size=4 * config.hidden_size,
                    num_hidden_layers=config.num_layers,
                    num_attention_heads=config.num_heads,
                )
            )
            width = config.hidden_size
            self.image_processor = CLOCImageProcessor(image_size=image_size)
        else:
            folder = resolve_model_folder(config.vision)
            self.vision = CLOCVisionTower.from_cloc(folder).eval().requires_grad_(False)
            width = self.vision.config.vision_config.hidden_size
            self.image_processor = CLOCImageProcessor.from_pretrained(folder)
        hidden = config.hidden_size
        self.projector = nn.Sequential(nn.Linear(width * config.merge**2, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.llm = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=len(tokenizer),
                hidden_size=hidden,
                intermediate_size=4 * hidden,
                num_hidden_layers=config.num_layers,
                num_attention_heads=config.num_heads,
                num_key_value_heads=config.num_heads,
                max_position_embeddings=512,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )

    def image_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` → projected image tokens ``(B, N, hidden)``."""
        if self.config.vision == "joint":
            tokens = self.vision(pixel_values=pixel_values).last_hidden_state[:, 1:]
        else:
            with torch.no_grad():
                tokens = self.vision.encode_images(pixel_values).hidden_states[-2]
            tokens = tokens[:, 1:] if self.vision.config.has_cls_token else tokens
        if self.config.merge > 1:
            tokens = merge_patch_tokens(tokens, self.config.merge)
        return self.projector(tokens)


def build_inputs(
    model: TinyGroundingLlava, tokenizer: PreTrainedTokenizerBase, questions: Sequence[Question], with_answers: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(inputs_embeds, attention_mask, labels)``: ``<s>``, image tokens and question in ``config.order``, then the
    answer and ``</s>`` (labels only there). Prompts alone (``with_answers=False``) are left-padded for generation."""
    pixels = torch.stack([model.image_processor.to_model_pixels(q.scene.image)[0] for q in questions])
    images = model.image_tokens(pixels)
    embed = model.llm.get_input_embeddings()
    bos = embed(torch.tensor([tokenizer.bos_token_id]))
    rows, labels = [], []
    for question, image in zip(questions, images, strict=True):
        text = embed(torch.tensor(tokenizer(question.text + "\n", add_special_tokens=False)["input_ids"]))
        parts = [bos, text, image] if model.config.order == "question_first" else [bos, image, text]
        label = [-100] * sum(part.shape[0] for part in parts)
        if with_answers:
            answer = tokenizer(encode_box(question.scene.objects[question.target].box), add_special_tokens=False)
            ids = [*answer["input_ids"], tokenizer.eos_token_id]
            parts.append(embed(torch.tensor(ids)))
            label += ids
        rows.append(torch.cat(parts))
        labels.append(label)
    width = max(row.shape[0] for row in rows)
    embeds = rows[0].new_zeros(len(rows), width, rows[0].shape[-1])
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    target = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (row, label) in enumerate(zip(rows, labels, strict=True)):
        span = slice(0, len(row)) if with_answers else slice(width - len(row), width)
        embeds[i, span], mask[i, span] = row, 1
        target[i, span] = torch.tensor(label)
    return embeds, mask, target


def score_answer(answer: str, question: Question) -> tuple[float, bool]:
    """The answer's first box against the scene (original frame): its IoU with the asked object, and whether the
    asked object is the one it overlaps most. No box: ``(0.0, False)``."""
    box = parse_first_box(answer)
    if box is None:
        return 0.0, False
    objects = torch.tensor([obj.box for obj in question.scene.objects])
    overlaps = box_iou_pairwise(torch.tensor([box]).expand_as(objects), objects)
    return float(overlaps[question.target]), int(overlaps.argmax()) == question.target


@torch.no_grad()
def evaluate(
    model: TinyGroundingLlava, tokenizer: PreTrainedTokenizerBase, world: SyntheticWorldConfig, step: int
) -> dict[str, float]:
    """Greedy answers on ``eval_scenes`` fresh scenes (seed ``eval_seed``): Acc@0.5, mean IoU, selection."""
    config = model.config
    model.eval()
    questions = SceneQuestions(config, world, config.eval_seed).draw(config.eval_scenes)
    hits, ious, selected, chance = 0, [], 0, 0.0
    for start in range(0, len(questions), 40):
        chunk = questions[start : start + 40]
        embeds, mask, _ = build_inputs(model, tokenizer, chunk, with_answers=False)
        generated = model.llm.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            max_new_tokens=24,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        for question, ids in zip(chunk, generated, strict=True):
            chance += 1.0 / len(question.scene.objects)
            iou, is_selected = score_answer(tokenizer.decode(ids, skip_special_tokens=True), question)
            ious.append(iou)
            hits += int(iou >= 0.5)
            selected += int(is_selected)
    model.train()
    count = len(questions)
    return {
        "step": step,
        "acc@0.5": hits / count,
        "miou": float(np.mean(ious)),
        "selection": selected / count,
        "selection_chance": chance / count,
        "questions": count,
    }


def run(config: CalibrationConfig, out: Path, progress: bool = True) -> list[dict[str, float]]:
    """Train and evaluate; every evaluation is appended to ``out/eval.jsonl`` and returned."""
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    world = SyntheticWorldConfig()
    sample = SceneQuestions(config, world, config.seed + 1).draw(256)
    texts = [f"{q.text}\n{encode_box(o.box)}" for q in sample for o in q.scene.objects]
    tokenizer = train_chat_tokenizer(texts, vocab_size=512)
    model = TinyGroundingLlava(config, tokenizer, world.image_size)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / config.warmup_steps))
    stream = SceneQuestions(config, world, config.seed)
    results, losses, start = [], [], time.perf_counter()
    bar = tqdm(range(1, config.steps + 1), desc="calibration", disable=not progress)
    for step in bar:
        embeds, mask, labels = build_inputs(model, tokenizer, stream.draw(config.batch_size), with_answers=True)
        loss = model.llm(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{np.mean(losses[-25:]):.4f}")
        if step in config.eval_at or step == config.steps:
            row = evaluate(model, tokenizer, world, step)
            row.update(loss=float(np.mean(losses[-50:])), seconds=time.perf_counter() - start)
            results.append(row)
            print(json.dumps(row), flush=True)
            with (out / "eval.jsonl").open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(row) + "\n")
    (out / "config.json").write_text(json.dumps(asdict(config), indent=1), encoding="utf-8")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = CalibrationConfig()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--eval-at", type=int, nargs="*", default=defaults.eval_at)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--vision", default=defaults.vision, help="'joint' or a CLOC checkpoint folder (frozen)")
    parser.add_argument("--merge", type=int, default=defaults.merge)
    parser.add_argument("--order", choices=ORDERS, default=defaults.order)
    parser.add_argument("--expressions", choices=EXPRESSIONS, default=defaults.expressions)
    parser.add_argument("--any-shapes", action="store_true", help="scenes may repeat a shape (as the world's)")
    parser.add_argument("--eval-scenes", type=int, default=defaults.eval_scenes)
    parser.add_argument("--hidden-size", type=int, default=defaults.hidden_size)
    parser.add_argument("--num-layers", type=int, default=defaults.num_layers)
    args = parser.parse_args(argv)
    config = CalibrationConfig(
        steps=args.steps,
        eval_at=args.eval_at,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        vision=args.vision,
        merge=args.merge,
        order=args.order,
        expressions=args.expressions,
        distinct_shapes=not args.any_shapes,
        eval_scenes=args.eval_scenes,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
    )
    run(config, args.out, progress=sys.stderr.isatty())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
