"""vLLM's offline ``LLM.generate`` with the CLOC-LLaVA plugin: greedy tokens equal our ``generate`` (0, 1 and 3
regions, one batch) for the Vicuna layout and for the synthetic-world recipe's (question before the image, 2 x 2
merged image tokens; also a two-turn prompt with regions before and after the image), and bad region requests raise
a clear ``ValueError``."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from bench.chat_servers import REPO, VLLM_PYTHON, vllm_env
from bench.vllm_tiny import CASES, ChatCase
from tests.vllm.conftest import TinyModel
from tests.vllm.tiny_vllm import MAX_NEW_TOKENS, TWO_TURNS


def _run_offline(model: TinyModel, tmp_path: Path, bad: bool, cases: list[ChatCase] = CASES) -> dict:
    """Our references' prompts of ``cases`` (and, with ``bad``, two bad region requests) through
    ``offline_worker.py``."""
    requests = []
    for case in cases:
        image = tmp_path / f"{case.name}.png"
        case.image.save(image)
        ref = model.references[case.name]
        requests.append({"name": case.name, "prompt": ref["prompt"], "image": str(image), "regions": ref["boxes"]})
    first = requests[1]  # one region: "What is [x1, y1, x2, y2] <region>?"
    two_regions = first["prompt"].replace("<region>", "<region> <region>")
    bad_requests = [
        {**first, "name": "box_outside", "regions": [[1.2, 1.2, 1.5, 1.5]]},
        {**first, "name": "more_regions_than_boxes", "prompt": two_regions},
    ]
    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps(
            {
                "model": str(model.folder),
                "max_tokens": MAX_NEW_TOKENS,
                "requests": requests,
                "bad_requests": bad_requests if bad else [],
            }
        )
    )
    out = tmp_path / "out.json"
    run = subprocess.run(
        [str(VLLM_PYTHON), str(REPO / "tests/vllm/offline_worker.py"), str(spec), str(out)],
        env=vllm_env(), cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    return json.loads(out.read_text())


def _assert_answers_equal(result: dict, refs: dict, cases: list[ChatCase] = CASES) -> None:
    for case in cases:
        got, ref = result["answers"][case.name], refs[case.name]
        assert got["prompt_token_ids"] == ref["prompt_token_ids"], case.name  # <image> expanded, same tokens
        assert got["token_ids"] == ref["token_ids"], (case.name, got, ref)
        # vLLM's detokenizer holds back a trailing incomplete UTF-8 sequence (the random model writes byte soup)
        assert got["text"] == ref["text"].rstrip("\ufffd")


def test_offline_generate_equals_ours(tiny_vllm_model: TinyModel, tmp_path: Path) -> None:
    result = _run_offline(tiny_vllm_model, tmp_path, bad=True)
    _assert_answers_equal(result, tiny_vllm_model.references)
    errors = result["bad_requests"]
    assert "regions[0]: box [1.2, 1.2, 1.5, 1.5]" in errors["box_outside"]
    assert "2 <region> tokens but 1 regions" in errors["more_regions_than_boxes"]


def test_offline_instruction_first_merged_tokens(tiny_vllm_instruction_first_model: TinyModel, tmp_path: Path) -> None:
    model = tiny_vllm_instruction_first_model
    prompt = model.references["no_region"]["prompt"]
    assert prompt.index("Where is the red circle?") < prompt.index("<image>")  # the recipe's layout
    cases = [*CASES, TWO_TURNS]
    two_turns = model.references[TWO_TURNS.name]["prompt"]  # turn 1: region before the image; turn 2: after
    assert two_turns.index("<region>") < two_turns.index("<image>") < two_turns.rindex("<region>")
    result = _run_offline(model, tmp_path, bad=False, cases=cases)
    _assert_answers_equal(result, model.references, cases)
    # 2 x 2 merge: a quarter of the image tokens of the unmerged tiny model (4 x 4 patches -> 4 tokens)
    image_token_id = json.loads((model.folder / "config.json").read_text())["image_token_id"]
    assert result["answers"]["no_region"]["prompt_token_ids"].count(image_token_id) == 4
