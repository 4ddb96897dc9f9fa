"""The backbone trunk on a faster runtime: ONNX Runtime or OpenVINO compute the hooked maps eager torch would.

The trunk (FeatureExtractor.maps: the backbone up to its last hooked stage, BatchNorm folded) is
exported once per backbone, weights, stages and input size to an ONNX file in a user cache folder,
then run by the chosen engine. Only the trunk moves: the embedding, the Gaussian, Mahalanobis and
the maps stay in torch. Before an engine is used its maps are compared with eager torch's on one
seeded batch; an engine that is not installed, fails to build or disagrees falls back to torch with
one warning line, so a run never depends on an engine being right.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from utils.cli import first_line
from utils.config import cores_here
from utils.padim.backbones import FeatureExtractor, float32_precision
from utils.padim.onnx_graph import quiet_exporter
from utils.runtime.output_files import file_sha256

log = logging.getLogger(__name__)

PARITY_TOLERANCE = 1e-4  # largest relative difference of any hooked map from eager torch's
CACHE_FORMAT_VERSION = 1
TRUNK_OPSET = 18
# The fastest full-float32 engine per backbone on a CPU (bench.py's forward-only columns, benchmarks/README.md).
AUTO_ENGINE = {
    "efficientnet_lite0": "openvino",
    "efficientnet_b5": "openvino",
    "resnet18": "onnxruntime",
    "wide_resnet50_2": "onnxruntime",
}


class EngineError(Exception):
    """Why an engine cannot run here, in one line: the caller falls back to torch or refuses."""


def cache_folder() -> Path:
    """Where exported trunks are kept: $PADIM_CACHE_DIR, else $XDG_CACHE_HOME/padim-suite, else ~/.cache/padim-suite."""
    if os.environ.get("PADIM_CACHE_DIR"):
        return Path(os.environ["PADIM_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "padim-suite"


def engine_threads(workers: int = 0) -> int:
    """Threads an engine may use: this process's share of the cores (utils.config.cores_here) less the
    DataLoader workers that decode beside it, at least one."""
    return max(1, cores_here() - workers)


def bf16_supported() -> bool:
    """Whether the CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), as /proc/cpuinfo says."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def chosen_engine(wanted: str, backbone: str, device: torch.device) -> str:
    """The engine that runs: `auto` is the fastest measured for the backbone on a CPU and torch on a GPU;
    an explicit engine on a GPU falls back to torch (these engines run the CPU build here)."""
    if device.type != "cpu":
        if wanted not in ("auto", "torch"):
            log.warning("--engine %s runs on the CPU only: the backbone on %s runs in torch", wanted, device)
        return "torch"
    return AUTO_ENGINE.get(backbone, "torch") if wanted == "auto" else wanted


class TrunkGraph(nn.Module):
    """The extractor's hooked maps as a tuple: the module exported to ONNX."""

    def __init__(self, extractor: FeatureExtractor):
        super().__init__()
        self.extractor = extractor

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.extractor.maps(images))


def trunk_key(extractor: FeatureExtractor, weights_id: str, seed: int, input_size: tuple[int, int]) -> tuple[str, dict]:
    """Digest of what decides the exported trunk: backbone, weights (the seed for random ones), stages, input
    size, and the exporter's versions; a change of any of them is a new cache entry. Returns (digest, identity).
    onnx's version is read from its installed metadata: importing it costs most of a second, and a cached
    trunk needs no onnx at all."""
    identity = {
        "format_version": CACHE_FORMAT_VERSION,
        "backbone": extractor.spec.name,
        "weights_id": weights_id,
        "seed": seed if weights_id == "none" else None,
        "layers": list(extractor.layers),
        "input_size": list(input_size),
        "opset": TRUNK_OPSET,
        "torch": torch.__version__,
        "onnx": importlib.metadata.version("onnx"),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24], identity


def cached_trunk(extractor: FeatureExtractor, weights_id: str, seed: int, input_size: tuple[int, int]) -> Path:
    """The trunk's ONNX file in the cache, exported when absent or damaged.

    An entry is a folder holding trunk.onnx and entry.json (its identity and checksum). It is written
    in a private temporary folder and renamed into place whole, so two processes exporting at once
    never leave a half-written entry; an entry whose checksum or identity does not match is removed
    and exported again, never trusted.
    """
    key, identity = trunk_key(extractor, weights_id, seed, input_size)
    root = cache_folder() / "trunks"
    entry = root / key
    if entry.is_dir():
        if _entry_is_sound(entry, identity):
            return entry / "trunk.onnx"
        log.warning("trunk cache entry %s is damaged or stale: exporting it again", entry)
        shutil.rmtree(entry, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
    try:
        graph = building / "trunk.onnx"
        _export_trunk(extractor, graph, input_size)
        record = {"identity": identity, "sha256": file_sha256(graph)}
        (building / "entry.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        try:
            building.rename(entry)
        except OSError:  # another process put a complete entry there first
            if not _entry_is_sound(entry, identity):
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return entry / "trunk.onnx"


def _entry_is_sound(entry: Path, identity: dict) -> bool:
    try:
        record = json.loads((entry / "entry.json").read_text(encoding="utf-8"))
        return record["identity"] == identity and record["sha256"] == file_sha256(entry / "trunk.onnx")
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _export_trunk(extractor: FeatureExtractor, path: Path, input_size: tuple[int, int]) -> None:
    outputs = [f"maps_{layer}" for layer in extractor.layers]
    example = torch.zeros(2, 3, *input_size)
    # torch.export reads cuDNN's legacy allow_tf32, which torch can only answer while cuDNN is left at
    # TF32; the trace runs on the CPU, where the setting means nothing.
    with float32_precision(allow_tf32=True), quiet_exporter():
        program = torch.onnx.export(
            TrunkGraph(extractor).eval(),
            (example,),
            dynamo=True,
            opset_version=TRUNK_OPSET,
            input_names=["images"],
            output_names=outputs,
            dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
            verbose=False,
        )
    program.save(str(path))


class OnnxRuntimeTrunk:
    """The exported trunk in ONNX Runtime on the CPU."""

    def __init__(self, graph: Path, threads: int, precision: str):
        try:
            import onnxruntime
        except ImportError as err:
            raise EngineError("onnxruntime is not installed (pip install -r requirements.txt)") from err
        if precision != "fp32":
            raise EngineError("ONNX Runtime has no bfloat16 setting for x86 CPUs: use --engine openvino for bf16")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, images: np.ndarray) -> list[np.ndarray]:
        return self.session.run(None, {self.input_name: images})


class OpenVinoTrunk:
    """The exported trunk compiled by OpenVINO for the CPU, in float32 unless bf16 is asked for."""

    def __init__(self, graph: Path, threads: int, precision: str):
        try:
            import openvino
        except ImportError as err:
            raise EngineError("openvino is not installed (pip install -r requirements.txt)") from err
        core = openvino.Core()
        if precision == "bf16" and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            raise EngineError("this CPU has no native bfloat16 (AVX512-BF16 or AMX): use --precision fp32")
        config = {
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
            "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "LATENCY",
        }
        self.compiled = core.compile_model(core.read_model(str(graph)), "CPU", config)
        self.request = self.compiled.create_infer_request()

    def __call__(self, images: np.ndarray) -> list[np.ndarray]:
        results = self.request.infer({0: images}, share_inputs=True)
        return [np.array(results[output], copy=True) for output in self.compiled.outputs]


RUNTIMES = {"onnxruntime": OnnxRuntimeTrunk, "openvino": OpenVinoTrunk}


class EngineExtractor:
    """A FeatureExtractor whose maps come from another engine: same channels, stages and calls.

    Inputs of another size than the exported one (never in a run: every image is resized to the
    model input) are computed by eager torch.
    """

    def __init__(self, extractor: FeatureExtractor, runtime, engine: str, precision: str, input_size: tuple[int, int]):
        self.torch_extractor = extractor
        self.runtime = runtime
        self.engine = engine
        self.precision = precision
        self.input_size = tuple(input_size)
        self.spec, self.layers = extractor.spec, extractor.layers
        self.channels, self.dims = extractor.channels, extractor.dims

    def reduced_dim(self, requested: int | None) -> int:
        return self.torch_extractor.reduced_dim(requested)

    def maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The eager torch trunk's maps (what an exported scoring graph embeds)."""
        return self.torch_extractor.maps(images)

    def __call__(self, images: torch.Tensor) -> list[torch.Tensor]:
        if tuple(images.shape[2:]) != self.input_size:
            return self.torch_extractor(images)
        pixels = np.ascontiguousarray(images.detach().to("cpu", torch.float32).numpy())
        return [torch.from_numpy(maps) for maps in self.runtime(pixels)]


def parity_gap(engine: EngineExtractor, input_size: tuple[int, int], seed: int = 0) -> float:
    """Largest relative difference of the engine's hooked maps from eager torch's on a seeded batch of 3
    (per map: max |engine - torch| / max |torch|)."""
    images = torch.randn(3, 3, *input_size, generator=torch.Generator().manual_seed(seed))
    expected = engine.torch_extractor(images.contiguous(memory_format=torch.channels_last))
    got = engine(images)
    return max(
        float((g - e).abs().max() / e.abs().max().clamp_min(torch.finfo(torch.float32).tiny))
        for g, e in zip(got, expected)
    )


def engine_extractor(
    extractor: FeatureExtractor,
    wanted: str,
    precision: str,
    device: torch.device,
    input_size: tuple[int, int],
    weights_id: str,
    seed: int,
    workers: int = 0,
) -> FeatureExtractor | EngineExtractor:
    """The extractor to run: `extractor` itself for torch, else its trunk on the chosen engine, checked
    against torch. An engine that cannot run here falls back to torch with one warning line; bf16 that
    the CPU or the engine cannot do is refused (EngineError), never silently run in float32."""
    size = tuple(input_size)
    engine = chosen_engine(wanted, extractor.spec.name, device)
    if engine == "torch":
        if precision == "bf16":
            raise EngineError("--precision bf16 needs --engine openvino (the engine with a CPU bfloat16 setting)")
        return extractor
    if precision == "bf16" and not bf16_supported():
        raise EngineError("this CPU has no native bfloat16 (AVX512-BF16 or AMX): use --precision fp32")
    threads = engine_threads(workers)
    try:
        graph = cached_trunk(extractor, weights_id, seed, size)
        runtime = RUNTIMES[engine](graph, threads, precision)
        candidate = EngineExtractor(extractor, runtime, engine, precision, size)
        gap = parity_gap(candidate, size)
    except EngineError as err:
        if precision == "bf16":
            raise
        log.warning("--engine %s is not usable here (%s): the backbone runs in torch", engine, err)
        return extractor
    except Exception as err:  # an exporter or runtime failure of any kind means the same: use torch
        log.warning(
            "--engine %s failed to build the %s trunk (%s): the backbone runs in torch",
            engine,
            extractor.spec.name,
            first_line(err),
        )
        return extractor
    if precision == "fp32" and gap > PARITY_TOLERANCE:
        log.warning(
            "--engine %s: the %s trunk's maps differ from torch's by %.1e (more than %.0e): the backbone runs in torch",
            engine,
            extractor.spec.name,
            gap,
            PARITY_TOLERANCE,
        )
        return extractor
    log.info(
        "backbone %s on %s (%s, %d threads, maps within %.1e of torch)",
        extractor.spec.name,
        engine,
        precision,
        threads,
        gap,
    )
    return candidate
