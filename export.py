"""Export a trained model to one ONNX (or OpenVINO) graph, for inspection lines without torch.

`export.py --model <class results folder | padim_model.pt> --output model.onnx` writes the graph
(uint8 RGB images (N, S, S, 3) at the model input size -> anomaly_map (N, S, S), score (N,))
and, beside it, model.json: the geometry to prepare images with, the threshold to decide
with, and where the model came from. `--format openvino --output model.xml` writes the same graph
as OpenVINO's model.xml + model.bin. `predict.py --model model.onnx` (or model.xml) scores with it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from utils.cli import StrictParser, add_model_flags, at_least, log_to_console, run_main
from utils.config import DEFAULT_OPSET

log = logging.getLogger("padim.export")


def build_parser() -> argparse.ArgumentParser:
    parser = StrictParser(__doc__)
    add_model_flags(
        parser,
        "a class results folder (holding padim_model.pt) or the model file",
    )
    parser.add_argument(
        "--output", type=Path, required=True, help="the graph to write: a .onnx file, or with --format openvino a .xml"
    )
    parser.add_argument(
        "--format",
        default="onnx",
        choices=["onnx", "openvino"],
        help="onnx (ONNX Runtime, OpenVINO, ...) or openvino (its IR: <name>.xml + <name>.bin)",
    )
    parser.add_argument("--opset", type=at_least(DEFAULT_OPSET), default=DEFAULT_OPSET, help="ONNX opset of the graph")
    return parser


def run(args: argparse.Namespace) -> int:
    import torch

    from utils.padim.loading import LoadError, build, read_model
    from utils.padim.onnx_graph import export_graph, export_openvino_graph, write_description
    from utils.runtime.output_files import prove_writable

    suffix = {"onnx": ".onnx", "openvino": ".xml"}[args.format]
    if args.output.suffix != suffix:
        raise LoadError(f"--output {args.output}: a --format {args.format} graph's name must end in {suffix}")
    content, model_path, weights = read_model(args.model, args.weights)
    prove_writable(args.output.parent, "output folder", LoadError)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    model = build(content, model_path, weights, torch.device("cpu"), batch_size=1)
    log.info("exporting %s to %s (opset %d)", model_path, args.output, args.opset)
    if args.format == "openvino":
        data_path = export_openvino_graph(model.scorer, args.output, args.opset)
    else:
        data_path = export_graph(model.scorer, args.output, args.opset)
    description = write_description(args.output, data_path, content, model_path, model.geometry.input_size, args.opset)
    sizes = args.output.stat().st_size + (data_path.stat().st_size if data_path else 0)
    print(f"graph: {args.output}{f' + {data_path.name}' if data_path else ''} ({sizes / 2**20:.1f} MiB)")
    print(f"description: {description}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log_to_console()
    from utils.padim.loading import LOAD_ERRORS
    from utils.padim.onnx_graph import OnnxModelError
    from utils.runtime.output_files import OutputWriteError

    return run_main(run, args, (*LOAD_ERRORS, OnnxModelError, OutputWriteError), "the model was not exported")


if __name__ == "__main__":
    sys.exit(main())
