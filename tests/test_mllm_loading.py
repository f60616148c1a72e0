"""Attention-implementation and quantisation selection, and loading a saved checkpoint, on CPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.quantizers.quantizers_utils import should_convert_module

from mllm import CLOCLlavaForConditionalGeneration, loading
from mllm.tiny import tiny_config


@pytest.fixture()
def availability(monkeypatch):
    """Set what the availability checks report: ``availability(flash=..., bnb=..., cuda=...)``."""

    def set_(flash: bool = False, bnb: bool = False, cuda: bool = False) -> None:
        monkeypatch.setattr(loading, "flash_attn_available", lambda: flash)
        monkeypatch.setattr(loading, "bitsandbytes_available", lambda: bnb)
        monkeypatch.setattr(loading, "cuda_available", lambda: cuda)

    return set_


def test_attention_selection(availability):
    availability()
    assert loading.resolve_attn_implementation("sdpa") == "sdpa"
    assert loading.resolve_attn_implementation("eager") == "eager"
    assert loading.resolve_attn_implementation("auto") == "sdpa"
    with pytest.raises(ImportError, match="needs the flash_attn package"):
        loading.resolve_attn_implementation("flash_attention_2")
    availability(flash=True)
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        loading.resolve_attn_implementation("flash_attention_2")
    assert loading.resolve_attn_implementation(None) == "sdpa"
    availability(flash=True, cuda=True)
    assert loading.resolve_attn_implementation("flash_attention_2") == "flash_attention_2"
    assert loading.resolve_attn_implementation("auto") == "flash_attention_2"
    with pytest.raises(ValueError, match="attn_implementation='flash'"):
        loading.resolve_attn_implementation("flash")


def test_quantization_selection(availability):
    availability()
    assert loading.quantization_config_for(None) is None
    with pytest.raises(ValueError, match="supports 4 or 8"):
        loading.quantization_config_for(3)
    with pytest.raises(ImportError, match="needs the bitsandbytes package"):
        loading.quantization_config_for(4)
    availability(bnb=True)
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        loading.quantization_config_for(8)
    assert loading.quantization_config_for(8, allow_cpu=True).load_in_8bit
    availability(bnb=True, cuda=True)
    four = loading.quantization_config_for(4)
    assert four.load_in_4bit and four.bnb_4bit_quant_type == "nf4" and four.bnb_4bit_use_double_quant
    assert four.bnb_4bit_compute_dtype == torch.bfloat16
    assert four.llm_int8_skip_modules == list(loading.QUANTIZATION_SKIP_MODULES)


def test_skip_modules_keep_vision_and_projectors_unquantized(chat_tokenizer):
    model = CLOCLlavaForConditionalGeneration(tiny_config(chat_tokenizer))
    patterns = list(loading.QUANTIZATION_SKIP_MODULES)
    linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    converted = {name for name in linear if should_convert_module(name, patterns)}
    assert converted and all(name.startswith("model.language_model.layers.") for name in converted)
    kept = set(linear) - converted
    assert any(n.startswith("model.vision_tower.vision_model.") for n in kept)
    assert {
        "model.vision_tower.prompter.layer.q_proj",
        "model.multi_modal_projector.linear_1",
        "model.region_projector.linear_2",
        "lm_head",
    } <= kept
    # The pitfall the regexes avoid: a bare name matches only from the start of the path.
    assert should_convert_module("model.vision_tower.vision_model.encoder.layers.0.mlp.fc1", ["vision_tower"])


def test_loading_options(availability):
    availability()
    assert loading.loading_options() == {"attn_implementation": "sdpa"}
    assert loading.loading_options(attn_implementation="eager", device_map="cpu") == {
        "attn_implementation": "eager",
        "device_map": "cpu",
    }
    availability(bnb=True, cuda=True)
    options = loading.loading_options(bits=4)
    assert options["dtype"] == torch.bfloat16 and options["device_map"] == {"": 0}
    assert options["quantization_config"].load_in_4bit
    availability(bnb=True)
    assert loading.loading_options(bits=8, allow_cpu_quantization=True)["device_map"] == {"": "cpu"}
    availability(flash=True, cuda=True)
    assert loading.loading_options(attn_implementation="flash_attention_2")["dtype"] == torch.bfloat16


def test_load_pretrained_model_on_cpu(tmp_path, chat_tokenizer, availability):
    torch.manual_seed(0)
    model = CLOCLlavaForConditionalGeneration(tiny_config(chat_tokenizer)).eval()
    model.save_pretrained(tmp_path)
    ids = torch.randint(6, len(chat_tokenizer), (2, 12))
    outputs = {}
    for attn in ("sdpa", "eager"):
        loaded = loading.load_pretrained_model(tmp_path, attn_implementation=attn).eval()
        assert loaded.model.language_model.config._attn_implementation == attn
        assert loaded.model.vision_tower.vision_model.config._attn_implementation == attn
        with torch.no_grad():
            outputs[attn] = loaded(input_ids=ids, pixel_values=None).logits
    torch.testing.assert_close(outputs["sdpa"], outputs["eager"], rtol=1e-4, atol=1e-5)
    availability()
    with pytest.raises(ImportError, match="flash_attn"):
        loading.load_pretrained_model(tmp_path, attn_implementation="flash_attention_2")
    with pytest.raises(ImportError, match="bitsandbytes"):
        loading.load_pretrained_model(tmp_path, bits=4)
