"""Command line: ``python -m cloc_encoder.vesl --images DIR --captioner CAP --detector OWLV2 --out DIR``.

Defaults are the CLOC paper's (docs/vesl.md). Exit status 0 when the run finished, 2 on a usage or setup error.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from cloc_encoder.vesl.config import VESLConfig, VESLConfigError
from cloc_encoder.vesl.phrases import TaggerUnavailableError, read_word_list
from cloc_encoder.vesl.shards import format_summary

DEFAULTS = VESLConfig(out="", detector="")


def build_parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    parser = argparse.ArgumentParser(
        prog="python -m cloc_encoder.vesl",
        description="VESL region pseudo-labelling: caption → noun phrases → OWLv2 boxes → region-text shards.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="folder of images (searched recursively; ids are relative paths)")
    source.add_argument("--records", help="region-text JSONL file or folder of shards (their captions can be reused)")
    source.add_argument(
        "--webdataset", help="local img2dataset output: folder of *.tar or brace pattern (captions from {key}.txt)"
    )
    parser.add_argument("--out", required=True, help="output folder of shards and manifests (resumed if it exists)")
    parser.add_argument("--detector", required=True, help="local OWLv2 folder (Owlv2ForObjectDetection + processor)")
    parser.add_argument("--captioner", help="local image-to-text model folder; omit to use the records' captions")
    parser.add_argument("--caption-prompt", help="prompt for captioners that take one, in the model's own format")
    parser.add_argument(
        "--keep-captions", action="store_true", help="caption only records without a caption (default: re-caption all)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=d.caption_max_new_tokens, help="caption length limit")
    parser.add_argument("--num-beams", type=int, default=d.caption_num_beams, help="beam search width (1: greedy)")
    parser.add_argument("--image-size", type=int, default=d.detector_image_size, help="detector input side (pixels)")
    parser.add_argument("--threshold", type=float, default=d.box_threshold, help="keep boxes with confidence above")
    parser.add_argument("--max-phrases", type=int, default=d.max_phrases, help="noun phrases kept per caption")
    parser.add_argument("--grammar", default=d.grammar, help="nltk.RegexpParser chunk grammar (NP chunks are kept)")
    parser.add_argument("--ignore-words", help="file of generic words to drop (one per line; default: built-in list)")
    parser.add_argument("--nms-iou", type=float, help="non-maximum suppression of kept boxes at this IoU (off)")
    parser.add_argument("--max-regions", type=int, help="keep only the most confident boxes per image (all)")
    parser.add_argument(
        "--drop-images-without-regions", action="store_true", help="skip images with no box (default: keep them)"
    )
    parser.add_argument("--absolute-paths", action="store_true", help="write absolute image paths")
    parser.add_argument(
        "--format",
        dest="output_format",
        default=d.output_format,
        choices=["jsonl", "tar", "both"],
        help="shards as region-text JSONL, WebDataset tars with the images inside (+ sizes.json), or both",
    )
    parser.add_argument("--shard-size", type=int, default=d.shard_size, help="inputs per shard")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="images per model call")
    parser.add_argument("--device", default=d.device, help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default=d.dtype, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--max-shards", type=int, help="stop after this many new shards (resume later)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    ray = parser.add_argument_group("Ray cluster (pip install -e '.[vesl]')")
    ray.add_argument("--ray", action="store_true", help="run the stages with ray.data")
    ray.add_argument("--ray-address", help="ray.init address (default: RAY_ADDRESS or a local instance)")
    ray.add_argument("--captioner-actors", type=int, default=1, help="captioner actors")
    ray.add_argument("--detector-actors", type=int, default=1, help="detector actors")
    ray.add_argument("--gpus-per-actor", type=float, default=0.0, help="GPUs per captioner/detector actor")
    ray.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs per captioner/detector actor")
    return parser


def config_from_args(args: argparse.Namespace) -> VESLConfig:
    extra = {"ignore_words": tuple(read_word_list(args.ignore_words))} if args.ignore_words else {}
    return VESLConfig(
        out=args.out,
        detector=args.detector,
        images=args.images,
        records=args.records,
        webdataset=args.webdataset,
        output_format=args.output_format,
        captioner=args.captioner,
        recaption=not args.keep_captions,
        caption_prompt=args.caption_prompt,
        caption_max_new_tokens=args.max_new_tokens,
        caption_num_beams=args.num_beams,
        detector_image_size=args.image_size,
        box_threshold=args.threshold,
        max_phrases=args.max_phrases,
        grammar=args.grammar,
        nms_iou=args.nms_iou,
        max_regions_per_image=args.max_regions,
        keep_images_without_regions=not args.drop_images_without_regions,
        absolute_image_paths=args.absolute_paths,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        progress=not args.no_progress,
        max_shards=args.max_shards,
        **extra,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        config = config_from_args(args)
        if args.ray:
            from cloc_encoder.vesl.ray_runner import RayOptions, run_vesl_ray

            options = RayOptions(
                address=args.ray_address,
                captioner_actors=args.captioner_actors,
                detector_actors=args.detector_actors,
                gpus_per_actor=args.gpus_per_actor,
                cpus_per_actor=args.cpus_per_actor,
            )
            summary = run_vesl_ray(config, options)
        else:
            from cloc_encoder.vesl.pipeline import run_vesl

            summary = run_vesl(config)
    except (VESLConfigError, TaggerUnavailableError, FileNotFoundError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
