"""Converters from public annotation formats to the project's region-text JSONL (:mod:`cloc_encoder.data.format`).

Each converter returns ``(records, report)``: :class:`~cloc_encoder.data.format.RegionTextRecord` objects whose boxes
are ``xyxy`` normalised to ``[0, 1]`` by the original image size, and a :class:`ConversionReport` counting what was
skipped and why. Write the records with :func:`write_records` (atomic, through ``write_region_text``). The command
line is ``python -m cloc_encoder.data.convert {coco,lvis,vg,refcoco} ... --out FILE.jsonl``
(see ``docs/converters.md``).
"""

from cloc_encoder.data.converters.coco import convert_coco, convert_lvis
from cloc_encoder.data.converters.common import (
    PIXEL_TOLERANCE,
    ConversionError,
    ConversionReport,
    ImageLocator,
    MissingInputError,
    pixel_xywh_to_normalized,
    pixel_xyxy_to_normalized,
    write_records,
)
from cloc_encoder.data.converters.refcoco import convert_refcoco, refer_paths
from cloc_encoder.data.converters.visual_genome import convert_visual_genome

__all__ = [
    "PIXEL_TOLERANCE",
    "ConversionError",
    "ConversionReport",
    "ImageLocator",
    "MissingInputError",
    "convert_coco",
    "convert_lvis",
    "convert_refcoco",
    "convert_visual_genome",
    "pixel_xywh_to_normalized",
    "pixel_xyxy_to_normalized",
    "refer_paths",
    "write_records",
]
