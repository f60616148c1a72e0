"""CLOC-LLaVA: a CLOC encoder (ViT + region prompter) in a LLaVA-style MLLM with any causal LM.

Importing ``mllm`` registers the model with transformers' Auto classes (``AutoConfig``, ``AutoModel``,
``AutoModelForImageTextToText``, ``AutoProcessor``), so a saved checkpoint loads with
no ``trust_remote_code``.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from mllm.box_codec import BOX_CODECS, BoxCodec, encode_box, get_box_codec, parse_boxes, parse_first_box
from mllm.configuration_cloc_llava import CLOCLlavaConfig
from mllm.modeling_cloc_llava import (
    CLOCLlavaForConditionalGeneration,
    CLOCLlavaModel,
    CLOCLlavaPreTrainedModel,
)
from mllm.processing_cloc_llava import CLOCLlavaProcessor
from mllm.vision_tower import CLOCVisionTower

AutoConfig.register(CLOCLlavaConfig.model_type, CLOCLlavaConfig, exist_ok=True)
AutoModel.register(CLOCLlavaConfig, CLOCLlavaModel, exist_ok=True)
AutoModelForImageTextToText.register(CLOCLlavaConfig, CLOCLlavaForConditionalGeneration, exist_ok=True)
AutoProcessor.register(CLOCLlavaConfig, CLOCLlavaProcessor, exist_ok=True)

__all__ = [
    "BOX_CODECS",
    "BoxCodec",
    "CLOCLlavaConfig",
    "CLOCLlavaForConditionalGeneration",
    "CLOCLlavaModel",
    "CLOCLlavaPreTrainedModel",
    "CLOCLlavaProcessor",
    "CLOCVisionTower",
    "encode_box",
    "get_box_codec",
    "parse_boxes",
    "parse_first_box",
]
