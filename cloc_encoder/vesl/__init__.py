"""VESL (visually-enriched, spatially-localised) region pseudo-labelling for CLOC pretraining (docs/vesl.md).

Re-caption each image, extract noun phrases, localise them with OWLv2, keep each box with its most confident
phrase, and write region-text shards that ``train.cloc.pretrain`` reads. ``python -m cloc_encoder.vesl --help``.
"""

from cloc_encoder.vesl.config import VESLConfig, VESLConfigError
from cloc_encoder.vesl.detector import Detection, OwlDetector, padded_square_to_original, select_detections
from cloc_encoder.vesl.phrases import NP_GRAMMAR, OWLV2_GENERIC_WORDS, PhraseExtractor, TaggerUnavailableError
from cloc_encoder.vesl.pipeline import run_vesl

__all__ = [
    "NP_GRAMMAR",
    "OWLV2_GENERIC_WORDS",
    "Detection",
    "OwlDetector",
    "PhraseExtractor",
    "TaggerUnavailableError",
    "VESLConfig",
    "VESLConfigError",
    "padded_square_to_original",
    "run_vesl",
    "select_detections",
]
