"""Export a trained model to one ONNX graph, for inspection lines without torch.

`export.py --model <class results folder | padim_model.pt> --output model.onnx` writes the graph
(uint8 RGB images (N, S, S, 3) at the model input size -> anomaly_map (N, S, S), score (N,))
and, beside it, model.json: the geometry to prepare images with, the threshold to decide
with, and where the model came from. `predict.py --model model.onnx` scores with it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from utils.cli import StrictParser, at_least, install_log_handler, run_main

log = logging.getLogger("padim.export")


def build_parser() -> argparse.ArgumentParser:
    parser = StrictParser(__doc__)
    parser.add_argument(
        "--model", type=Path, required=True, help="a class results folder (holding padim_model.pt) or the model file"
    )
    parser.add_argument("--output", type=Path, required=True, help="the graph to write, a .onnx file")
    parser.add_argument("--opset", type=at_least(18), default=18, help="ONNX opset of the graph")
    parser.add_argument(
        "--weights",
        type=Path,
        help="the backbone state dict the model was trained with (only for models trained with --weights PATH)",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    import onnx
    import torch

    import predict
    from utils.padim.onnx_graph import (
        INPUT_NAME,
        ONNX_FORMAT,
        ONNX_FORMAT_VERSION,
        OUTPUT_NAMES,
        description_path,
        export_graph,
        file_sha256,
    )
    from utils.runtime.output_files import atomic_write, prove_writable

    if args.output.suffix != ".onnx":
        raise predict.PredictError(f"--output {args.output}: the graph's name must end in .onnx")
    content, model_path, weights = predict.read_model(args.model, args.weights)
    prove_writable(args.output.parent, "output folder", predict.PredictError)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    model = predict.build(content, model_path, weights, torch.device("cpu"), batch_size=1)
    log.info("exporting %s to %s (opset %d)", model_path, args.output, args.opset)
    data_path = export_graph(model.scorer, args.output, args.opset)
    size = model.geometry.input_size
    description = {
        "format": ONNX_FORMAT,
        "format_version": ONNX_FORMAT_VERSION,
        "graph": args.output.name,
        "graph_sha256": file_sha256(args.output),
        "external_data": data_path.name if data_path else None,
        "input": {"name": INPUT_NAME, "dtype": "uint8", "shape": ["N", size, size, 3], "layout": "NHWC, RGB"},
        "outputs": {OUTPUT_NAMES[0]: ["N", size, size], OUTPUT_NAMES[1]: ["N"]},
        "preprocessing": "decode to 8-bit RGB; resize the short side to `resize` (bilinear, antialiased), then "
        "centre-crop `cropsize`; cropsize 0: resize to resize x resize",
        "decision": "anomalous when score > threshold",
        "backbone": content["backbone"],
        "layers": content["layers"],
        "weights_id": content["weights_id"],
        "resize": content["resize"],
        "cropsize": content["cropsize"],
        "input_size": size,
        "threshold": content["threshold"],
        "threshold_provenance": content["threshold_provenance"],
        "class_name": content["class_name"],
        "source_model": model_path.name,
        "source_model_checksum": content["checksum"],
        "opset": args.opset,
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__},
    }
    atomic_write(
        description_path(args.output),
        lambda tmp: tmp.write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8"),
    )
    sizes = args.output.stat().st_size + (data_path.stat().st_size if data_path else 0)
    print(f"graph: {args.output}{f' + {data_path.name}' if data_path else ''} ({sizes / 2**20:.1f} MiB)")
    print(f"description: {description_path(args.output)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    install_log_handler("padim-console", logging.StreamHandler(sys.stderr), logging.INFO, "%(levelname)s: %(message)s")
    from predict import PredictError
    from utils.padim.model_file import ModelFileError
    from utils.padim.onnx_graph import OnnxModelError
    from utils.runtime.output_files import OutputWriteError

    return run_main(
        run, args, (PredictError, ModelFileError, OnnxModelError, OutputWriteError), "the model was not exported"
    )


if __name__ == "__main__":
    sys.exit(main())
