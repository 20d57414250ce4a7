"""`jaguar export RUN_DIR [-o model.onnx] [--int8]`: the run's embedding model as a self-describing ONNX
file (preprocessing in its metadata, flip TTA folded in), checked with onnxruntime against PyTorch;
`--int8` adds an onnxruntime-quantised copy with the agreement and retrieval figures it costs."""

from __future__ import annotations

import argparse

from jaguar.run import RunDir

_RUN = RunDir("RUN")  # the run folder as the help texts name it
# the library's defaults (jaguar.retrieval.export), repeated so that --help imports no torch
_TOLERANCE, _CHECK_IMAGES = 1e-4, 256


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export", help="export the embedding model to ONNX (optionally int8) for CPU laptops",
        description="Exports what `jaguar extract` computes (backbone, pooling, neck in eval mode, flip TTA and "
                    "scales averaged inside the graph; input B x 3 x H x W with a dynamic batch, output B x D "
                    "L2-normalised) with the preprocessing in the file's metadata. onnxruntime then embeds the "
                    "run's validation images and the export is refused when any embedding is further than "
                    "--tolerance (cosine distance) from PyTorch's. Use the file with `jaguar extract RUN --model "
                    "FILE` and `jaguar identify RUN --model FILE ...`. Needs `pip install -e \".[export]\"`.")
    parser.add_argument("run_dir", help=f"a trained run folder (or a zero-shot one: {_RUN.config_path.name} and no "
                                        "checkpoint)")
    parser.add_argument("-o", "--output", default=None,
                        help=f"ONNX file to write (default {_RUN.export_path()}; the int8 copy "
                             f"{_RUN.export_path(int8=True)}, or beside -o with -int8 added)")
    parser.add_argument("--int8", action="store_true", help="also write an int8-quantised copy (onnxruntime)")
    parser.add_argument("--int8-mode", default="static", choices=("static", "dynamic"),
                        help="static: int8 weights and activations, ranges calibrated on validation images "
                             "(faster on CPUs, the default); dynamic: int8 weights, activations quantised at run time")
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint folder or weights file (default: best, else the newest in "
                             f"{_RUN.checkpoints_dir}; none: the model as built)")
    parser.add_argument("--tolerance", type=float, default=_TOLERANCE,
                        help=f"largest cosine distance accepted between ONNX fp32 and PyTorch (default {_TOLERANCE:g})")
    parser.add_argument("--check-images", type=int, default=_CHECK_IMAGES,
                        help=f"validation images compared (default {_CHECK_IMAGES})")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from jaguar.retrieval.export import describe, export_run

    run = RunDir(args.run_dir)
    with run.writer_lock("jaguar export"):  # its default output is RUN/export/
        result = export_run(run, args.output, args.int8, args.int8_mode, args.checkpoint,
                            args.tolerance, args.check_images)
    print(describe(result, args.tolerance))
    return 0
