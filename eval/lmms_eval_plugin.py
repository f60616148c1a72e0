"""lmms-eval plugin: run any lmms-eval benchmark on a CLOC-LLaVA checkpoint.

    pip install 'cloc-mllm[lmms]'        # lmms-eval 0.7.3; the entry point is in this package's metadata
    python -m lmms_eval --model cloc_llava --model_args pretrained=runs/stage2 --tasks refcoco_bbox_rec_val

Registration goes through the entry-point group ``lmms_eval.models`` (``pyproject.toml``), whose payload
:func:`model_manifest` returns a ``ModelManifest`` pointing at :class:`CLOCLlava`. lmms-eval is imported lazily:
the project imports without it, and ``CLOCLlava`` (a subclass of ``lmms_eval.api.model.lmms``) is built on first
access. All the logic lives in :class:`CLOCLlavaEvaluator`, which needs no lmms-eval.

Answers: greedy decoding of left-padded batches (results do not depend on ``batch_size``), prompts rendered by the
checkpoint's own chat template, images in the order the task gives them. Every box the model writes (in its box
codec, e.g. ``[12, 340, 560, 999]`` on the 0–999 grid) is rewritten as 0–1 floats with 3 decimals
(``[0.012, 0.340, 0.561, 1.000]``), the format lmms-eval's grounding tasks (RefCOCO REC) parse; ``box_format=raw``
keeps the model's text. Region prompts (``<region>``) are not used by lmms-eval tasks and are not supported here.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from cloc_encoder.run_folder import resolve_model_folder
from mllm import CLOCLlavaProcessor
from mllm.box_codec import BOX_PATTERN, BoxCodec, get_box_codec
from mllm.loading import load_pretrained_model

MODEL_ID = "cloc_llava"
CLASS_PATH = "eval.lmms_eval_plugin.CLOCLlava"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BOX_FORMATS = ("float", "raw")


def model_manifest() -> Any:
    """Entry-point payload for ``lmms_eval.models``: the ``ModelManifest`` of ``cloc_llava``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)


def rewrite_boxes(text: str, codec: BoxCodec | str, target: BoxCodec | str = "float") -> str:
    """Every box written in ``text`` (read with ``codec``) rewritten with ``target`` (default: 3-decimal floats);
    the rest of the text is kept. A group that is not a valid box stays as it is."""
    codec, target = get_box_codec(codec), get_box_codec(target)

    def replace(match: Any) -> str:
        box = codec.decode_match(match)
        return match.group(0) if box is None else target.encode(box)

    return BOX_PATTERN.sub(replace, text)


def truncate_at(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    for stop in stops:
        if stop:
            text = text.split(stop, 1)[0]
    return text


class CLOCLlavaEvaluator:
    """The lmms-eval model interface for CLOC-LLaVA (mixed into ``lmms`` by :class:`CLOCLlava`).

    Args (lmms-eval ``--model_args``, all strings on the command line):
        pretrained: a saved CLOC-LLaVA folder (model + processor), or a training run (its latest checkpoint).
        device: torch device (default: ``cuda:<LOCAL_RANK>`` when a GPU is visible, else ``cpu``).
        dtype: ``auto`` (bfloat16 on GPU, float32 on CPU), ``float32``, ``bfloat16`` or ``float16``.
        batch_size: questions per ``generate`` call.
        max_new_tokens: answer length limit when the task sets none.
        attn_implementation: ``sdpa`` (default), ``eager``, ``flash_attention_2`` or ``auto``.
        box_format: ``float`` (boxes rewritten as 0–1 floats, 3 decimals) or ``raw`` (the model's box text).
        system_prompt: a system turn for every prompt (default: the chat template's own).
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int | str = 1,
        max_new_tokens: int | str = 256,
        attn_implementation: str = "sdpa",
        box_format: str = "float",
        system_prompt: str | None = None,
        max_batch_size: int | str | None = None,
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise TypeError(f"cloc_llava: unknown model_args {sorted(unknown)}; see eval/lmms_eval_plugin.py")
        if box_format not in BOX_FORMATS:
            raise ValueError(f"cloc_llava: box_format={box_format!r}; choose one of {BOX_FORMATS}")
        if str(dtype) != "auto" and str(dtype) not in DTYPES:
            raise ValueError(f"cloc_llava: dtype={dtype!r}; choose auto or one of {sorted(DTYPES)}")
        self.batch_size_per_gpu = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        if self.batch_size_per_gpu < 1 or self.max_new_tokens < 1:
            raise ValueError("cloc_llava: batch_size and max_new_tokens must be positive")
        if device is None:
            local_rank = int(os.environ.get("LOCAL_RANK", 0))
            device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        self._device = torch.device(device)
        torch_dtype = DTYPES.get(str(dtype), torch.bfloat16 if self._device.type == "cuda" else torch.float32)
        folder = resolve_model_folder(pretrained)
        self._model = load_pretrained_model(
            folder, dtype=torch_dtype, attn_implementation=attn_implementation, local_files_only=True
        ).to(self._device)
        self._model.eval()
        self.processor = CLOCLlavaProcessor.from_pretrained(folder, local_files_only=True)
        self.pretrained = str(folder)
        self.box_format = box_format
        self.system_prompt = system_prompt

    # ----- what lmms-eval reads ---------------------------------------------------------------------------------

    @property
    def model(self) -> torch.nn.Module:
        return self._model

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    # ----- prompts and answers ----------------------------------------------------------------------------------

    def prompt(self, context: str, num_images: int) -> str:
        """The chat-template prompt of one user turn: the images first (unless ``context`` already places its
        ``<image>`` tokens), then ``context``, ending with the generation prompt."""
        image_token = self.processor.image_token
        if image_token in context:
            if context.count(image_token) != num_images:
                raise ValueError(f"the prompt has {context.count(image_token)} {image_token} for {num_images} images")
            content: Any = context
        else:
            content = [{"type": "image"}] * num_images + [{"type": "text", "text": context}]
        messages: list[dict[str, Any]] = []
        if self.system_prompt:
            messages.append({"role": "system", "content": self.system_prompt})
        messages.append({"role": "user", "content": content})
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _inputs(self, prompts: Sequence[str], images: Sequence[Sequence[Image.Image]]) -> dict[str, torch.Tensor]:
        flat = [image.convert("RGB") for sample in images for image in sample]
        inputs = self.processor(images=flat or None, text=list(prompts), padding=True, padding_side="left")
        inputs = {key: value.to(self._device) for key, value in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self._model.dtype)
        return inputs

    @torch.inference_mode()
    def _generate(
        self, contexts: Sequence[str], images: Sequence[Sequence[Image.Image]], max_new_tokens: int
    ) -> list[str]:
        """Greedy answers (the model's raw text) to a batch of contexts, each with its images."""
        prompts = [self.prompt(context, len(sample)) for context, sample in zip(contexts, images, strict=True)]
        inputs = self._inputs(prompts, images)
        tokenizer = self.tokenizer
        output = self._model.generate(
            **inputs,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        return [text.strip() for text in self.processor.batch_decode(new_tokens, skip_special_tokens=True)]

    def format_answer(self, text: str) -> str:
        """The returned text: boxes rewritten as 0–1 floats (``box_format=float``), or the raw answer."""
        return rewrite_boxes(text, self.processor.codec) if self.box_format == "float" else text

    def _visuals(self, doc_to_visual: Callable, doc_id: int, task: str, split: str) -> list[Image.Image]:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
        visuals = [v for v in visuals if v is not None]
        for visual in visuals:
            if not isinstance(visual, Image.Image):
                raise NotImplementedError(f"cloc_llava answers about images only; task {task} gave {type(visual)}")
        return visuals

    # ----- the lmms interface -----------------------------------------------------------------------------------

    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        """Answer ``(context, gen_kwargs, doc_to_visual, doc_id, task, split)`` requests, in request order."""
        results: list[str] = [""] * len(requests)
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(index)
        bar = tqdm(total=len(requests), desc="cloc_llava", disable=self.rank != 0)
        for indices in groups.values():
            gen_kwargs = dict(requests[indices[0]].args[1])
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new_tokens = int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens)
            indices.sort(key=lambda i: -len(requests[i].args[0]))  # similar lengths share a batch
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                contexts = [requests[i].args[0] for i in batch]
                images = [self._visuals(*requests[i].args[2:6]) for i in batch]
                for i, answer in zip(batch, self._generate(contexts, images, max_new_tokens), strict=True):
                    results[i] = self.format_answer(truncate_at(answer, until).strip())
                    self.cache_hook.add_partial("generate_until", (requests[i].args[0], gen_kwargs), results[i])
                bar.update(len(batch))
        bar.close()
        return results

    def generate_until_multi_round(self, requests: Sequence[Any]) -> list[Any]:
        """lmms-eval's multi-round protocol, one document at a time: after each round the task's ``doc_to_text``
        gets the previous outputs and returns the next (visuals, context, done, outputs, info)."""
        results = []
        for request in tqdm(requests, desc="cloc_llava rounds", disable=self.rank != 0):
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            max_new_tokens = int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens)
            visuals = self._visuals(doc_to_visual, doc_id, task, split)
            outputs: list[str] = []
            info, round_index = None, 0
            while True:
                outputs.append(self.format_answer(self._generate([context], [visuals], max_new_tokens)[0]))
                round_index += 1
                visuals, context, done, returned, info = doc_to_text(
                    doc, previous_output=outputs, round_idx=round_index, previous_round_info=info
                )
                outputs = list(returned) if returned is not None else outputs
                if done:
                    break
                visuals = [v for v in visuals or [] if v is not None]
            results.append(outputs)
        return results

    @torch.inference_mode()
    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        """``(log p(continuation | prompt), whether greedy decoding gives the continuation)`` per request; the
        continuation is tokenized alone and appended to the chat-template prompt's tokens."""
        results = []
        for request in tqdm(requests, desc="cloc_llava loglikelihood", disable=self.rank != 0):
            context, continuation, doc_to_visual, doc_id, task, split = request.args
            if callable(continuation):
                continuation = continuation(self.task_dict[task][split][doc_id])
            images = self._visuals(doc_to_visual, doc_id, task, split)
            inputs = self._inputs([self.prompt(context, len(images))], [images])
            target = self.tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"]
            target = target.to(self._device)
            if target.shape[1] == 0:
                results.append((0.0, True))
                continue
            prompt_length = inputs["input_ids"].shape[1]
            inputs["input_ids"] = torch.cat([inputs["input_ids"], target], dim=1)
            inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
            logits = self._model(**inputs).logits[0, prompt_length - 1 : -1].float()
            log_probs = torch.log_softmax(logits, dim=-1).gather(1, target[0][:, None])
            greedy = bool((logits.argmax(dim=-1) == target[0]).all())
            results.append((float(log_probs.sum()), greedy))
        return results


REC_FUNCTIONS = "lmms_eval.tasks.refcoco.utils_rec"
REC_METRICS = {
    "refcoco_IoU": "iou",
    "refcoco_ACC@0.1": "acc01",
    "refcoco_ACC@0.3": "acc03",
    "refcoco_ACC@0.5": "acc05",
    "refcoco_ACC@0.7": "acc07",
    "refcoco_ACC@0.9": "acc09",
    "refcoco_Center_ACC": "center_acc",
}


def write_rec_task(
    out_dir: str | os.PathLike[str],
    data_files: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    task: str = "refcoco_bbox_rec_local",
    split: str = "val",
) -> Path:
    """Write ``out_dir/<task>.yaml``: lmms-eval's RefCOCO REC task (its own prompt, parser and metrics, referenced
    as ``!function lmms_eval.tasks.refcoco.utils_rec.*``) on local parquet files in the ``lmms-lab/RefCOCO``
    schema (columns ``question_id``, ``image``, ``answer`` (list of expressions), ``bbox`` ``[x, y, w, h]`` pixels,
    ...). Run it with ``--include_path out_dir --tasks <task>``; returns the YAML's path."""
    files = [data_files] if isinstance(data_files, (str, os.PathLike)) else list(data_files)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        f"task: {task}",
        "dataset_path: parquet",
        "dataset_kwargs:",
        "  data_files:",
        f"    {split}:",
        *[f"      - {Path(f).resolve().as_posix()}" for f in files],
        f"test_split: {split}",
        "output_type: generate_until",
        f"process_docs: !function {REC_FUNCTIONS}.refcoco_bbox_rec_preprocess_dataset",
        f"doc_to_visual: !function {REC_FUNCTIONS}.refcoco_bbox_rec_doc_to_visual",
        f"doc_to_text: !function {REC_FUNCTIONS}.refcoco_bbox_rec_doc_to_text",
        'doc_to_target: "bbox"',
        "generation_kwargs:",
        "  until:",
        '    - "ASSISTANT:"',
        f"process_results: !function {REC_FUNCTIONS}.refcoco_bbox_rec_process_result",
        "metric_list:",
    ]
    for metric, suffix in REC_METRICS.items():
        lines += [
            f"  - metric: {metric}",
            f"    aggregation: !function {REC_FUNCTIONS}.refcoco_bbox_rec_{suffix}",
            "    higher_is_better: true",
        ]
    lines += ["metadata:", "  version: 0.0"]
    path = out / f"{task}.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _lmms_class() -> type:
    """``CLOCLlava``: :class:`CLOCLlavaEvaluator` mixed into ``lmms_eval.api.model.lmms`` (imports lmms-eval)."""
    if importlib.util.find_spec("lmms_eval") is None:
        raise ImportError("eval.lmms_eval_plugin.CLOCLlava needs lmms-eval: pip install 'cloc-mllm[lmms]'")
    from lmms_eval.api.model import lmms

    cls = type("CLOCLlava", (CLOCLlavaEvaluator, lmms), {"__module__": __name__, "__doc__": CLOCLlavaEvaluator.__doc__})
    return cls


_CLASSES: dict[str, type] = {}


def __getattr__(name: str) -> type:
    """Build ``CLOCLlava`` on first access (PEP 562), so importing this module does not import lmms-eval."""
    if name != "CLOCLlava":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in _CLASSES:
        _CLASSES[name] = _lmms_class()
    return _CLASSES[name]


__all__ = [
    "CLASS_PATH",
    "MODEL_ID",
    "CLOCLlavaEvaluator",
    "model_manifest",
    "rewrite_boxes",
    "truncate_at",
    "write_rec_task",
]
