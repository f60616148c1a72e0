"""Run requests through vLLM's offline ``LLM.generate`` (in the vLLM venv) and write the results as JSON.

Usage (what ``tests/vllm/test_vllm_offline.py`` runs)::

    .venv-vllm/bin/python tests/vllm/offline_worker.py SPEC.json OUT.json

``SPEC.json``: ``{"model": DIR, "max_tokens": N, "requests": [{"name", "prompt", "image", "regions"}, ...]}`` with
``image`` a PNG path and ``regions`` the boxes of the prompt's ``<region>`` tokens (original frame). ``OUT.json``:
per name the prompt token ids vLLM built, the generated token ids and their text; and per name of
``bad_requests`` the error message (or ``null`` when vLLM accepted the request).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def _request(item: dict[str, Any]) -> dict[str, Any]:
    from PIL import Image

    request: dict[str, Any] = {"prompt": item["prompt"]}
    if item.get("image"):
        request["multi_modal_data"] = {"image": Image.open(item["image"]).convert("RGB")}
    if item.get("regions") is not None:
        request["mm_processor_kwargs"] = {"regions": item["regions"]}
    return request


def main(spec_path: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.exceptions import VLLMValidationError

    spec = json.loads(Path(spec_path).read_text())
    llm = LLM(model=spec["model"], dtype="float32", enforce_eager=True, max_model_len=1024, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"])
    requests = spec["requests"]
    outputs = llm.generate([_request(item) for item in requests], params)  # one batch: several region counts
    result: dict[str, Any] = {"answers": {}, "bad_requests": {}}
    for item, output in zip(requests, outputs, strict=True):
        result["answers"][item["name"]] = {
            "prompt_token_ids": list(output.prompt_token_ids),
            "token_ids": list(output.outputs[0].token_ids),
            "text": output.outputs[0].text,
        }
    for item in spec.get("bad_requests", []):
        try:
            llm.generate([_request(item)], params)
            result["bad_requests"][item["name"]] = None
        except (VLLMValidationError, ValueError) as error:
            result["bad_requests"][item["name"]] = str(error)
    Path(out_path).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":  # vLLM starts its engine in a spawned process: keep the guard
    main(*sys.argv[1:3])
