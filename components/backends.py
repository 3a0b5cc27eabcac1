"""The registry of PyTorch CPU inference backends the pipeline compares.

Each backend has a name, a one-line description, how it is enabled, its arithmetic precision
and an availability check. ``get(name).prepare(model, example)`` turns an eval-mode fp32 model
into a callable mapping a normalized float32 batch (N x 3 x 32 x 32) to float32 logits; it never
modifies ``model`` and makes its first call on ``example`` (so lazy initialisation and
compilation are part of the preparation, not of the first timed run). Backends that need
calibration images (``needs_calibration``) take them as ``prepare(..., calibration=images)``.

Unavailable backends stay registered and say why (``unavailable()`` returns the reason), so a
benchmark reports them as skipped instead of dropping them. A backend whose speed-up this CPU
cannot deliver but whose library would silently run it anyway (oneDNN bf16 fast math on a CPU
without bf16 support quietly computes in fp32) is reported unavailable rather than measured as
a fake "bf16" result.
"""

from __future__ import annotations

import copy
import hashlib
import os
import platform
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from torch import nn

from components.runtime import process_temp_dir, read_cpu

Predict = Callable[[torch.Tensor], torch.Tensor]
REFERENCE = "eager"
ARM = platform.machine() in ("aarch64", "arm64")


class BackendUnavailable(RuntimeError):
    pass


def _usable() -> str | None:
    return None


@dataclass(frozen=True)
class Backend:
    name: str
    description: str
    enabled_by: str
    precision: str
    build: Callable[[nn.Module, torch.Tensor, torch.Tensor | None], Predict]
    unavailable: Callable[[], str | None] = _usable   # the reason it cannot run here, or None
    needs_calibration: bool = False

    def prepare(self, model: nn.Module, example: torch.Tensor, calibration: torch.Tensor | None = None) -> Predict:
        reason = self.unavailable()
        if reason:
            raise BackendUnavailable(f"backend {self.name!r} is unavailable here: {reason}")
        if self.needs_calibration and calibration is None:
            raise ValueError(f"backend {self.name!r} needs calibration images: "
                             "prepare(model, example, calibration=<normalized N x 3 x 32 x 32 training images>)")
        model = copy.deepcopy(model).eval()
        predict = self.build(model, example, calibration)
        predict(example)
        return predict


# --------------------------------------------------------------------------- oneDNN switches
@contextmanager
def onednn(enabled: bool, fp32_precision: str | None = None) -> Iterator[None]:
    """Switch oneDNN (and, if given, its fp32 math mode for conv + matmul) for a block, then restore.

    Sets the ``torch.backends.mkldnn`` properties directly: ``torch.backends.mkldnn.flags()``
    also resets the deprecated TF32 switch and warns on every call.
    """
    mkldnn = torch.backends.mkldnn
    previous = (mkldnn.enabled, mkldnn.conv.fp32_precision, mkldnn.matmul.fp32_precision)
    mkldnn.enabled = enabled
    if fp32_precision:
        mkldnn.conv.fp32_precision = mkldnn.matmul.fp32_precision = fp32_precision
    try:
        yield
    finally:
        mkldnn.enabled, mkldnn.conv.fp32_precision, mkldnn.matmul.fp32_precision = previous


def _run_with(fn: Predict, enabled: bool, fp32_precision: str | None = None) -> Predict:
    def run(x: torch.Tensor) -> torch.Tensor:
        with onednn(enabled, fp32_precision), torch.inference_mode():
            return fn(x)
    return run


# --------------------------------------------------------------------------- torch backends
def _eager(model, example, calibration) -> Predict:
    return _run_with(model, enabled=False)


def _onednn(model, example, calibration) -> Predict:
    return _run_with(model, enabled=True)


def _onednn_bf16(model, example, calibration) -> Predict:
    return _run_with(model, enabled=True, fp32_precision="bf16")


def _channels_last(model, example, calibration) -> Predict:
    model = model.to(memory_format=torch.channels_last)
    return _run_with(lambda x: model(x.contiguous(memory_format=torch.channels_last)), enabled=True)


def _torchscript(model, example, calibration) -> Predict:
    with warnings.catch_warnings(), onednn(True), torch.no_grad():
        # TorchScript is deprecated upstream (FutureWarning on every call below); it still works.
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
        frozen = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(model, example)))
    return _run_with(frozen, enabled=True)


def _compile(model, example, calibration) -> Predict:
    # freezing: weights become constants, so inductor folds BatchNorm and prepacks oneDNN conv
    # weights; dynamic=False: one static kernel per batch size (1 and 64 here).
    compiled = torch.compile(model, dynamic=False, options={"freezing": True})
    return _run_with(compiled, enabled=True)


# --------------------------------------------------------------------------- ONNX Runtime
SHARED_DIR_ENV = "GTSRB_BACKENDS_DIR"      # exports a parent process made, for its server workers


def _state_digest(model: nn.Module) -> str:
    digest = hashlib.sha256(type(model).__qualname__.encode())
    for key, value in model.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@cache
def _workdir() -> Path:
    """Where ONNX files go, named by the weights' digest: the directory a parent process shared
    (:func:`share_exports`), else a new one, removed when this process exits."""
    if os.environ.get(SHARED_DIR_ENV):
        return Path(os.environ[SHARED_DIR_ENV])
    return process_temp_dir("gtsrb-backends-")


def share_exports() -> Path:
    """Let the processes started from here (the predictor's server workers) reuse this process's
    ONNX exports and int8 quantizations instead of repeating them (~4 s each here)."""
    os.environ[SHARED_DIR_ENV] = str(_workdir())
    return _workdir()


@contextmanager
def _written_whole(path: Path) -> Iterator[Path]:
    """A temporary name to write ``path`` under; renamed to ``path`` when complete, so a process
    that finds ``path`` never reads a half-written file."""
    partial = path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix}")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def export_onnx(model: nn.Module, example: torch.Tensor) -> Path:
    """fp32 ONNX file with a dynamic batch dimension (torch.export-based exporter), once per weights
    (one self-contained file: the weights inside, not in a ``.data`` file beside it)."""
    path = _workdir() / f"{_state_digest(model)}.onnx"
    if not path.exists():
        start = time.perf_counter()
        batch = torch.export.Dim("batch", min=1, max=4096)
        with _written_whole(path) as partial:
            torch.onnx.export(model, (example,), str(partial), input_names=["x"], output_names=["logits"],
                              dynamic_shapes=({0: batch},), external_data=False, verbose=False)
        print(f"backends: exported ONNX in {time.perf_counter() - start:.1f}s", flush=True)
    return path


def _ort_session(path: Path) -> Predict:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()   # the same fixed thread count as torch
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: x.contiguous().numpy()})[0])
    return run


def _onnxruntime(model, example, calibration) -> Predict:
    return _ort_session(export_onnx(model, example))


def cpu_flags() -> set[str]:
    """x86 ``flags`` / arm64 ``Features`` of the first CPU in /proc/cpuinfo (empty if unreadable)."""
    try:
        return set(read_cpu().flags)
    except OSError:
        return set()


def int8_types(arm: bool = ARM, flags: set[str] | None = None) -> tuple[str, str, bool, str]:
    """(activation type, weight type, reduce_range, why) for ORT static int8 on this CPU.

    u8 x s8 is ORT's fast path. Where the CPU has a u8 x s8 dot product accumulating in int32
    (x86 VNNI / AMX, arm64 dot product) full 8-bit weights are exact. Plain AVX2 multiplies
    u8 x s8 pairs into a saturating int16 (vpmaddubsw), so there weights use 7 bits
    (reduce_range), as ONNX Runtime recommends for CPUs without VNNI.
    """
    flags = cpu_flags() if flags is None else flags
    if arm:
        return "QUInt8", "QInt8", False, "arm64: u8 x s8 via dot-product instructions"
    vnni = sorted(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
    if vnni:
        return "QUInt8", "QInt8", False, f"{'/'.join(vnni)}: u8 x s8 accumulates in int32 without saturation"
    return "QUInt8", "QInt8", True, "no VNNI/AMX: 7-bit weights keep AVX2's saturating u8 x s8 int16 pairs exact"


INT8_OPS = ["Conv", "Gemm", "MatMul"]   # the arithmetic; normalization, pooling and BN stay fp32
CALIBRATION_BATCH = 64                  # images per batch fed to the int8 calibrator


def fp32_ends(onnx_path) -> list[str]:
    """The first and the last INT8_OPS node: kept in fp32, as usual for int8 CNNs. The first conv
    sees 3 input channels (int8 gains nothing there) and the last layer makes the logits
    (effect measured: docs/measurements.md)."""
    import onnx

    names = [n.name for n in onnx.load(str(onnx_path)).graph.node if n.op_type in INT8_OPS]
    return [names[0], names[-1]] if len(names) > 2 else []


def _onnxruntime_int8(model, example, calibration) -> Predict:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32 = export_onnx(model, example)
    activations, weights, reduce_range, _ = int8_types()
    out = fp32.with_name(f"{fp32.stem}-int8-{activations}-{weights}{'-rr' * reduce_range}-fp32ends-"
                        f"{_digest(calibration)}.onnx")
    if not out.exists():
        start = time.perf_counter()
        prepared = fp32.with_name(f".{fp32.stem}.{os.getpid()}-pre.onnx")
        quant_pre_process(str(fp32), str(prepared))

        class Batches(CalibrationDataReader):
            def __init__(self):
                step = CALIBRATION_BATCH
                self.batches = iter(calibration[i:i + step].contiguous().numpy()
                                    for i in range(0, len(calibration), step))

            def get_next(self):
                batch = next(self.batches, None)
                return None if batch is None else {"x": batch}

        with _written_whole(out) as partial:
            quantize_static(str(prepared), str(partial), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                            reduce_range=reduce_range, op_types_to_quantize=INT8_OPS,
                            nodes_to_exclude=fp32_ends(prepared), activation_type=getattr(QuantType, activations),
                            weight_type=getattr(QuantType, weights))
        prepared.unlink()
        print(f"backends: int8 quantization ({activations} x {weights}{', reduce_range' * reduce_range}, "
              f"{len(calibration)} calibration images) in {time.perf_counter() - start:.1f}s", flush=True)
    return _ort_session(out)


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()[:12]


# --------------------------------------------------------------------------- availability
def _no_mkldnn() -> str | None:
    return None if torch.backends.mkldnn.is_available() else "this torch build has no oneDNN (mkldnn)"


def _no_bf16() -> str | None:
    reason = _no_mkldnn()
    if reason or torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return reason
    need = ("the bf16 extension (bf16 in Features)" if ARM
            else "AVX-512 (avx512bw/vl/dq; avx512_bf16/amx_bf16 in hardware)")
    return (f"this CPU lacks {need}, so oneDNN ignores bf16 fast math and would silently compute "
            "in fp32; nothing to measure")


def _no_compiler() -> str | None:
    from torch._inductor import config

    compiler = config.cpp.cxx[0] if isinstance(config.cpp.cxx, tuple) and config.cpp.cxx[0] else "g++"
    return None if shutil.which(compiler) else f"no C++ compiler ({compiler}) on PATH for inductor's CPU codegen"


def _no_onnxruntime() -> str | None:
    try:
        import onnxruntime
        import onnxscript  # noqa: F401  (the torch.export-based ONNX exporter needs it)
    except ImportError as e:
        return f"{e.name} is not installed"
    if "CPUExecutionProvider" not in onnxruntime.get_available_providers():
        return "onnxruntime has no CPUExecutionProvider"
    return None


def _no_quantizer() -> str | None:
    reason = _no_onnxruntime()
    if reason:
        return reason
    try:
        import onnxruntime.quantization  # noqa: F401
    except ImportError as e:
        return f"onnxruntime.quantization cannot be imported ({e})"
    return None


def _int8_description() -> str:
    activations, weights, reduce_range, why = int8_types()
    return (f"{activations[1:].lower()} activations x {'7-bit ' * reduce_range}{weights[1:].lower()} weights "
            f"on {'/'.join(INT8_OPS)}, first and last layer fp32 ({why})")


BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("eager", "fp32, oneDNN off: ATen's native kernels"
            + (" with OpenBLAS (the learning path's 'OpenBLAS')" if ARM else " (MKL/NNPACK)"),
            "torch.backends.mkldnn.enabled = False", "fp32", _eager),
    Backend("onednn", "fp32, oneDNN on, NCHW"
            + (" with Arm Compute Library (the learning path's 'ACL')" if ARM else ""),
            "torch.backends.mkldnn.enabled = True (the default)", "fp32", _onednn, _no_mkldnn),
    Backend("onednn-bf16", "oneDNN with bf16 fast math: fp32 tensors, conv/matmul computed in bf16",
            "torch.backends.mkldnn.{conv,matmul}.fp32_precision = 'bf16' (like DNNL_DEFAULT_FPMATH_MODE=BF16)",
            "bf16", _onednn_bf16, _no_bf16),
    Backend("channels-last", "fp32, oneDNN on, NHWC (channels_last) weights and input",
            "model.to(memory_format=torch.channels_last); x.contiguous(memory_format=torch.channels_last)",
            "fp32", _channels_last, _no_mkldnn),
    Backend("torchscript", "fp32, traced + frozen TorchScript, oneDNN on (BN folded, oneDNN layouts)",
            "torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(model, x)))",
            "fp32", _torchscript, _no_mkldnn),
    Backend("compile", "fp32, torch.compile inductor CPU codegen with frozen weights (C++/OpenMP + oneDNN)",
            "torch.compile(model, dynamic=False, options={'freezing': True}); cache: TORCHINDUCTOR_CACHE_DIR",
            "fp32", _compile, _no_compiler),
    Backend("onnxruntime", "fp32, ONNX export (torch.export-based) run by ONNX Runtime's CPU execution provider",
            "torch.onnx.export(dynamo) -> onnxruntime.InferenceSession(CPUExecutionProvider)",
            "fp32", _onnxruntime, _no_onnxruntime),
    Backend("onnxruntime-int8", "int8, ONNX Runtime static quantization (QDQ, per-channel weights) calibrated "
            "on training images: " + _int8_description(),
            "onnxruntime.quantization.quantize_static(QDQ, MinMax calibration) -> CPUExecutionProvider",
            "int8", _onnxruntime_int8, _no_quantizer, needs_calibration=True),
)}


def get(name: str) -> Backend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}") from None
