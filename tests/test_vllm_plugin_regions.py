"""The vLLM plugin's pieces that need no vLLM: its package imports nothing heavy, and the ``regions`` rule on a
rendered prompt matches ``serve.engine`` (tests/vllm/ runs the plugin itself in vLLM)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mllm import CLOCLlavaProcessor
from mllm.tiny import tiny_config
from serve import InputError
from serve.engine import ChatEngine
from serve.vllm_plugin.regions import parse_regions, resolve_regions


class _Model:
    """Stands in for the model: ``ChatEngine`` only calls ``eval()`` on it when built."""

    def eval(self) -> _Model:
        return self


def test_plugin_package_imports_without_vllm() -> None:
    """The entry point's package loads in a venv without vLLM and imports nothing of vLLM (``register`` does)."""
    code = "import sys, serve.vllm_plugin; print('vllm' in sys.modules, serve.vllm_plugin.ARCHITECTURE)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "CLOCLlavaForConditionalGeneration"]


@pytest.fixture(scope="module")
def processor(chat_tokenizer) -> CLOCLlavaProcessor:
    return CLOCLlavaProcessor.from_model_config(tiny_config(chat_tokenizer), chat_tokenizer)


def test_references_expand_as_serve_engine(processor: CLOCLlavaProcessor) -> None:
    regions = [[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.9, 0.9]]
    message = "Is [region0] left of [region1]? And [100, 200, 300, 400] <region>?"
    text, boxes = resolve_regions(f"USER: <image>\n{message} ASSISTANT:", parse_regions(regions), processor)
    engine = ChatEngine(_Model(), processor)  # type: ignore[arg-type]  (expand_regions uses the processor only)
    expected_text, expected_boxes = engine.expand_regions(message, regions)
    assert text == f"USER: <image>\n{expected_text} ASSISTANT:"
    assert boxes == expected_boxes


def test_boxes_per_region_token_and_errors(processor: CLOCLlavaProcessor) -> None:
    text = "USER: <image>\n<region> and <region>"
    assert resolve_regions(text, parse_regions([[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]]), processor)[1] == [
        (0.0, 0.0, 0.5, 0.5),
        (0.5, 0.5, 1.0, 1.0),
    ]
    with pytest.raises(InputError, match="2 <region> tokens but 1 regions"):
        resolve_regions(text, parse_regions([[0, 0, 0.5, 0.5]]), processor)
    with pytest.raises(InputError, match="has no box"):
        resolve_regions(text, [], processor)
    with pytest.raises(InputError, match=r"\[region1\] refers to an unknown region"):
        resolve_regions("[region0] [region1]", parse_regions([[0, 0, 0.5, 0.5]]), processor)
    with pytest.raises(InputError, match="regions"):
        parse_regions("everywhere")
    with pytest.raises(InputError, match=r"regions\[0\]"):
        parse_regions([[1.2, 1.2, 1.5, 1.5]])
