"""CLOC encoder: region-aware CLIP with a promptable region prompter (Chen et al., ICML 2025)."""

from transformers import AutoConfig, AutoModel

from cloc_encoder.configuration_cloc import CLOCConfig
from cloc_encoder.modeling_cloc import CLOCImageState, CLOCModel, CLOCOutput, CLOCPreTrainedModel

AutoConfig.register(CLOCConfig.model_type, CLOCConfig, exist_ok=True)
AutoModel.register(CLOCConfig, CLOCModel, exist_ok=True)

__all__ = ["CLOCConfig", "CLOCImageState", "CLOCModel", "CLOCOutput", "CLOCPreTrainedModel"]
