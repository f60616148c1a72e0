"""Zero-shot evaluation of a CLOC encoder alone (``python -m eval encoder-zeroshot``): the protocol and scores in
:mod:`eval.zeroshot.evaluate`, the subcommand in :mod:`eval.zeroshot.cli`.

The package re-exports :mod:`eval.zeroshot.evaluate`, so ``from eval.zeroshot import load_instance_set`` (the module
this package replaced) keeps working.
"""

from eval.zeroshot.evaluate import (
    ENSEMBLE_TEMPLATES,
    IMAGE_TEMPLATES,
    REGION_TEMPLATES,
    ImageFolderSet,
    InstanceSet,
    check_templates,
    class_text_embeddings,
    evaluate_image_zeroshot,
    evaluate_region_zeroshot,
    load_image_folder,
    load_instance_set,
)

__all__ = [
    "ENSEMBLE_TEMPLATES",
    "IMAGE_TEMPLATES",
    "REGION_TEMPLATES",
    "ImageFolderSet",
    "InstanceSet",
    "check_templates",
    "class_text_embeddings",
    "evaluate_image_zeroshot",
    "evaluate_region_zeroshot",
    "load_image_folder",
    "load_instance_set",
]
