"""The registry of PyTorch CPU inference backends the pipeline compares.

Each backend has a name, a one-line description, how it is enabled, its arithmetic precision
and an availability check. ``get(name).prepare(model, example)`` turns an eval-mode fp32 model
into a callable mapping a normalized float32 batch (N x 3 x 32 x 32) to float32 logits; it never
modifies ``model`` and makes its first call on a batch of ``example``'s shape (so lazy
initialisation and compilation are part of the preparation, not of the first timed run).
Backends that need calibration images (``needs_calibration``) take them as
``prepare(..., calibration=images)``.

No backend reports a precision it did not compute in. Preparing checks it twice, at its batch size
and at batch 1: by the numbers (its logits must differ from fp32's the way its precision rounds) and
by what ran (a reduced-precision backend's convolutions and matrix products must run in bf16 or int8
kernels, as the profiler or ONNX Runtime's optimized graph shows, not fp32 kernels between
quantize/dequantize or rounding steps). A backend failing either raises
:class:`PrecisionNotComputed`, so it is reported skipped with that reason.
Unavailable backends stay registered and say why (``unavailable()`` returns the reason), so a
benchmark reports them as skipped instead of dropping them.
"""

from __future__ import annotations

import copy
import hashlib
import os
import platform
import re
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
from torch.nn.utils.fusion import fuse_conv_bn_eval

from components.runtime import process_temp_dir, read_cpu

Predict = Callable[[torch.Tensor], torch.Tensor]
REFERENCE = "eager"
ARM = platform.machine() in ("aarch64", "arm64")


class BackendUnavailable(RuntimeError):
    pass


class PrecisionNotComputed(BackendUnavailable):
    """Preparing showed that the backend does not compute in the precision it names."""


def _usable() -> str | None:
    return None


# How far a backend's logits may lie from fp32's, as the relative RMS error ||got - fp32|| / ||fp32||
# on the probe batch. fp32 backends differ only by summation order (~1e-6 here).
# bf16 (8-bit significand) and int8 (256 levels) round every weight and activation to about
# 2^-8 of its magnitude: a network computed in them lands near 1e-2. The floor between the two
# (2^-13: 32x below a single bf16 rounding, 100x above fp32's reordering) tells a reduced-precision
# run from fp32 in disguise; the ceiling says the backend computes something else.
REDUCED_FLOOR = 2.0 ** -13
REDUCED_CEILING = 0.25
ERROR_BANDS = {"fp32": (0.0, REDUCED_FLOOR), "bf16": (REDUCED_FLOOR, REDUCED_CEILING),
               "int8": (REDUCED_FLOOR, REDUCED_CEILING)}


PROBE_SEED = 0


def probe_batch(example: torch.Tensor) -> torch.Tensor:
    """Seeded standard-normal images of ``example``'s shape: every layer sees varied values, also
    where the caller's example is blank (the predictor prepares on zeros)."""
    return torch.randn(example.shape, generator=torch.Generator().manual_seed(PROBE_SEED))


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| over the whole batch of logits (float64)."""
    got, want = got.detach().double(), want.detach().double()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def precision_problem(precision: str, got: torch.Tensor, fp32: torch.Tensor) -> str | None:
    """Why logits ``got`` cannot have been computed in ``precision`` given the fp32 logits of the
    same batch, or None if they lie in that precision's band (:data:`ERROR_BANDS`)."""
    if precision not in ERROR_BANDS:
        raise ValueError(f"unknown precision {precision!r}; known: {', '.join(ERROR_BANDS)}")
    low, high = ERROR_BANDS[precision]
    error = relative_error(got, fp32)
    if not torch.isfinite(got).all():
        return f"its logits are not all finite (claims {precision})"
    if error < low:
        return (f"claims {precision} but its logits differ from fp32 by {error:.1e} (relative RMS), below "
                f"the {low:.1e} that {precision} rounding gives: it computed in fp32")
    if error > high:
        return (f"its logits differ from fp32 by {error:.1e} (relative RMS), above the {high:.1e} that "
                f"{precision} rounding explains: it computes a different function")
    return None


# --------------------------------------------------------------------------- what ran
# The dtype the profiler records for a kernel's first input (the activations), per precision.
KERNEL_DTYPES = {"bf16": {"c10::BFloat16"}, "int8": {"unsigned char", "signed char", "c10::quint8", "c10::qint8"}}
_MATRIX_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::baddbmm"}


_LAYER_OP = re.compile(r"(^|_|q)(conv(\d|_|olution|$)|linear(_|$))")


def _arithmetic(op: str) -> bool:
    """A convolution or matrix product, under any of the names ATen, oneDNN, MKL or inductor's
    extern kernels give them (aten::conv2d, mkldnn::_convolution_pointwise, onednn::qconv_pointwise,
    mkl::_mkl_linear, quantized::linear, ...; not prims::convert_element_type)."""
    return op in _MATRIX_OPS or bool(_LAYER_OP.search(op.rsplit("::", 1)[-1]))


@contextmanager
def _quiet_fd2() -> Iterator[None]:
    """Standard error (the file descriptor) silenced for a block: the profiler's C++ side prints
    start/stop and GPU-probe lines there that would read as errors in a CPU pipeline's log."""
    import sys

    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def kernels_run(predict: Predict, x: torch.Tensor) -> list[tuple[str, str]]:
    """(operator, dtype of its first input) of each convolution and matrix product one call of
    ``predict`` ran, as torch's profiler records them (the outermost operator of each, so
    aten::conv2d and the aten::mkldnn_convolution it calls count once). One call runs before, so
    a compilation for ``x``'s shape is not what is recorded."""
    from torch.profiler import ProfilerActivity, profile

    predict(x)
    with _quiet_fd2(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        predict(x)

    def outermost(event) -> bool:
        parent = event.cpu_parent
        while parent is not None:
            if _arithmetic(parent.name):
                return False
            parent = parent.cpu_parent
        return True
    return [(e.name, (e.input_dtypes or [""])[0]) for e in prof.events() if _arithmetic(e.name) and outermost(e)]


def kernel_problem(precision: str, ran: list[tuple[str, str]], expected: int) -> str | None:
    """Why ``ran`` (from :func:`kernels_run`) shows fewer than ``expected`` convolutions and matrix
    products computed in ``precision`` (their inputs in its dtype), or None."""
    reduced = [op for op, dtype in ran if dtype in KERNEL_DTYPES[precision]]
    if len(reduced) >= expected:
        return None
    others = sorted({f"{op} on {dtype or '?'}" for op, dtype in ran if dtype not in KERNEL_DTYPES[precision]})
    return (f"claims {precision} but only {len(reduced)} of the {expected} convolutions/matrix products it should "
            f"compute in {precision} ran {precision} kernels; the others ran {', '.join(others) or 'nothing'} "
            f"({precision} simulated in fp32)")


def _layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]


def _all_bf16(predict: Predict, x: torch.Tensor, fp32_model: nn.Module) -> str | None:
    """Every convolution and matrix product ran a bf16 kernel."""
    return kernel_problem("bf16", kernels_run(predict, x), len(_layers(fp32_model)))


def _int8_between_fp32_ends(predict: Predict, x: torch.Tensor, fp32_model: nn.Module) -> str | None:
    """Every layer but the fp32 first and last (:func:`pt2e_fp32_ends`) ran an int8 kernel."""
    expected = len(_layers(fp32_model)) - len(pt2e_fp32_ends(fp32_model))
    return kernel_problem("int8", kernels_run(predict, x), expected)


@dataclass(frozen=True)
class Backend:
    name: str
    description: str
    enabled_by: str
    precision: str
    build: Callable[[nn.Module, torch.Tensor, torch.Tensor | None], Predict]
    unavailable: Callable[[], str | None] = _usable   # the reason it cannot run here, or None
    needs_calibration: bool = False
    exports: str | None = None   # the format of the file prepare() writes and serving loads ("onnx")
    # what ran: (predict, probe batch, the fp32 model) -> why its kernels are not in `precision`, or None
    kernels: Callable[[Predict, torch.Tensor, nn.Module], str | None] | None = None

    def prepare(self, model: nn.Module, example: torch.Tensor, calibration: torch.Tensor | None = None) -> Predict:
        """The backend's predict function, checked on :func:`probe_batch` of ``example``'s shape (so
        a shape-specialising backend compiles for it) and of batch 1 (the serving batch) against
        the fp32 model: its logits must differ from fp32 the way its precision does
        (:func:`precision_problem`) and its ``kernels`` check must find no fp32 arithmetic posing
        as reduced precision, else :class:`PrecisionNotComputed`."""
        reason = self.unavailable()
        if reason:
            raise BackendUnavailable(f"backend {self.name!r} is unavailable here: {reason}")
        if self.needs_calibration and calibration is None:
            raise ValueError(f"backend {self.name!r} needs calibration images: "
                             "prepare(model, example, calibration=<normalized N x 3 x 32 x 32 training images>)")
        fp32_model = copy.deepcopy(model).eval()
        model = copy.deepcopy(model).eval()
        predict = self.build(model, example, calibration)
        for probe in [probe_batch(example)] + ([probe_batch(example[:1])] if len(example) > 1 else []):
            with onednn(False), torch.inference_mode():   # ATen's fp32, whatever oneDNN's fp32 math mode says
                fp32 = fp32_model(probe)
            got = predict(probe)                            # compiles for this shape, if it compiles
            problem = ((self.kernels and self.kernels(predict, probe, fp32_model))
                       or precision_problem(self.precision, got, fp32))
            if problem:
                raise PrecisionNotComputed(f"backend {self.name!r} {problem} (batch {len(probe)})")
        return predict


# --------------------------------------------------------------------------- oneDNN switches
@contextmanager
def onednn(enabled: bool) -> Iterator[None]:
    """Switch oneDNN on or off for a block, then restore. Sets ``torch.backends.mkldnn.enabled``
    directly: ``torch.backends.mkldnn.flags()`` also resets the deprecated TF32 switch and warns
    on every call."""
    mkldnn = torch.backends.mkldnn
    previous, mkldnn.enabled = mkldnn.enabled, enabled
    try:
        yield
    finally:
        mkldnn.enabled = previous


def _run_with(fn: Predict, enabled: bool) -> Predict:
    def run(x: torch.Tensor) -> torch.Tensor:
        with onednn(enabled), torch.inference_mode():
            return fn(x)
    return run


# --------------------------------------------------------------------------- torch backends
def _eager(model, example, calibration) -> Predict:
    return _run_with(model, enabled=False)


def _onednn(model, example, calibration) -> Predict:
    return _run_with(model, enabled=True)


def _onednn_bf16(model, example, calibration) -> Predict:
    model = model.to(torch.bfloat16, memory_format=torch.channels_last)
    return _run_with(lambda x: model(_to_bf16(x)).float(), enabled=True)


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


def _channels_last(model, example, calibration) -> Predict:
    model = model.to(memory_format=torch.channels_last)
    return _run_with(lambda x: model(_nhwc(x)), enabled=True)


def _torchscript(model, example, calibration) -> Predict:
    with warnings.catch_warnings(), onednn(True), torch.no_grad():
        # TorchScript is deprecated upstream (FutureWarning on every call below); it still works.
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
        frozen = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(model, example)))
    return _run_with(frozen, enabled=True)


class _FlattenChannelsLast(nn.Module):
    """``nn.Flatten`` of an N x C x H x W map in (H, W, C) order: a view of a channels-last map."""

    def forward(self, x):
        return x.permute(0, 2, 3, 1).flatten(1)


def flatten_channels_last(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """The eval-mode ``model`` with each ``nn.Flatten`` of a 4-d map that feeds an ``nn.Linear``
    (through dropouts, the identity in eval mode) flattening in (H, W, C) order, the linear
    layer's input columns permuted to match (in place; the same function up to float rounding).

    The compiled backends keep their maps channels-last (oneDNN's layout), so flattening in
    torch's (C, H, W) order is a transpose. In PT2E's int8 graph inductor fused that transpose into
    the activations' quantization as a scalar loop (an integer division per element): 0.37 ms of
    batch 64's 2.4 ms on a 2-core AMX Xeon, where the flatten is now a view; fp32 `compile` gained
    5 % (docs/backends-measurements.md)."""
    found = {}                                      # flatten -> (its Sequential, index, the linear layer)
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        layers = list(seq)
        for i, flatten in enumerate(layers):
            following = [m for m in layers[i + 1:] if not isinstance(m, nn.Dropout)]
            if (isinstance(flatten, nn.Flatten) and (flatten.start_dim, flatten.end_dim) == (1, -1)
                    and following and isinstance(following[0], nn.Linear)):
                found[flatten] = (seq, i, following[0])
    shapes = {}
    hooks = [f.register_forward_hook(lambda m, args, _out: shapes.__setitem__(m, args[0].shape)) for f in found]
    with torch.no_grad():
        model(example[:1])
    for hook in hooks:
        hook.remove()
    for flatten, (seq, i, linear) in found.items():
        if len(shapes.get(flatten, ())) != 4:
            continue
        _, c, h, w = shapes[flatten]
        with torch.no_grad():
            linear.weight.copy_(linear.weight.view(-1, c, h, w).permute(0, 2, 3, 1).reshape(linear.weight.shape))
        seq[i] = _FlattenChannelsLast()
    return model


@contextmanager
def _frozen_weights() -> Iterator[None]:
    """Inductor freezing for the compilations in a block: weights become constants, so inductor
    folds BatchNorm and prepacks oneDNN (also int8) weights. Set as the global switch, which
    dynamo reads too (it then treats parameters as static), unlike ``options={'freezing': True}``;
    a plain attribute swap, as ``config.patch`` costs ~0.1 ms per call."""
    from torch._inductor import config

    previous, config.freezing = config.freezing, True
    try:
        yield
    finally:
        config.freezing = previous


def _compiled(model: nn.Module, prepare_input: Callable[[torch.Tensor], torch.Tensor] | None = None,
              prepare_output: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Predict:
    """``model`` under torch.compile with frozen weights; dynamic=False: one static kernel per
    batch size (compiled on its first call, 1 and 64 here)."""
    compiled = torch.compile(model, dynamic=False)

    def run(x: torch.Tensor) -> torch.Tensor:
        with _frozen_weights():
            y = compiled(prepare_input(x) if prepare_input else x)
        return prepare_output(y) if prepare_output else y
    return _run_with(run, enabled=True)


def _compile(model, example, calibration) -> Predict:
    model = flatten_channels_last(model, example).to(memory_format=torch.channels_last)
    return _compiled(model, _nhwc)


def _to_bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16, memory_format=torch.channels_last)


def _to_fp32(y: torch.Tensor) -> torch.Tensor:
    return y.float()


def _compile_bf16(model, example, calibration) -> Predict:
    model = flatten_channels_last(model, example)
    return _compiled(model.to(torch.bfloat16, memory_format=torch.channels_last), _to_bf16, _to_fp32)


# --------------------------------------------------------------------------- ONNX Runtime
def _state_digest(model: nn.Module) -> str:
    digest = hashlib.sha256(type(model).__qualname__.encode())
    for key, value in model.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@cache
def _workdir() -> Path:
    """Where ONNX files go, named by the weights' digest; removed when this process exits (the
    evaluate step copies the file it measured into its ``served`` artifact first)."""
    return process_temp_dir("gtsrb-backends-")


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
    """An ONNX Runtime session on ``path`` (components/ort.py: the predictor sets it up the same
    way); the callable's ``exported`` attribute is the file it runs, for the served artifact."""
    from components import ort

    session = ort.session(path, torch.get_num_threads())   # the same fixed thread count as torch

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session(x.contiguous().numpy()))
    run.exported = path
    return run


def _onnxruntime(model, example, calibration) -> Predict:
    return _ort_session(export_onnx(model, example))


def cpu_flags() -> set[str]:
    """x86 ``flags`` / arm64 ``Features`` of the first CPU in /proc/cpuinfo (empty if unreadable)."""
    try:
        return set(read_cpu().flags)
    except OSError:
        return set()


def int8_dot_products(arm: bool = ARM, flags: set[str] | None = None) -> list[str]:
    """The CPU's u8 x s8 dot products accumulating in int32 (x86 VNNI / AMX, arm64 SDOT / I8MM):
    what makes int8 4x the MACs of an fp32 FMA per instruction."""
    flags = cpu_flags() if flags is None else flags
    return sorted(flags & ({"asimddp", "i8mm"} if arm else {"avx512_vnni", "avx_vnni", "amx_int8"}))


def int8_types(arm: bool = ARM, flags: set[str] | None = None) -> tuple[str, str, bool, str]:
    """(activation type, weight type, reduce_range, why) for ORT static int8 on this CPU.

    u8 x s8 is ORT's fast path. Where the CPU has a u8 x s8 product accumulating in int32 (x86
    VNNI / AMX, arm64's dot product or NEON's widening multiplies) full 8-bit weights are exact.
    Plain AVX2 multiplies u8 x s8 pairs into a saturating int16 (vpmaddubsw), so there weights use 7 bits
    (reduce_range), as ONNX Runtime recommends for CPUs without VNNI.
    """
    dot = int8_dot_products(arm, flags)
    if arm:
        return "QUInt8", "QInt8", False, (f"arm64 {'/'.join(dot)}: u8 x s8 dot products accumulate in int32" if dot else
                                          "arm64 without dot-product instructions: NEON widening multiplies "
                                          "accumulate in int32 (exact, slower)")
    if dot:
        return "QUInt8", "QInt8", False, f"{'/'.join(dot)}: u8 x s8 accumulates in int32 without saturation"
    return "QUInt8", "QInt8", True, "no VNNI/AMX: 7-bit weights keep AVX2's saturating u8 x s8 int16 pairs exact"


INT8_OPS = ["Conv", "Gemm", "MatMul"]   # the arithmetic
# What ORT int8 quantizes: the arithmetic, and the ReLU and max-pool between quantized convolutions
# (batch norm folded into them first, _onnxruntime_int8), so ONNX Runtime runs each block as one
# QLinearConv with the ReLU fused, then a u8 max-pool, straight into the next QLinearConv.
QDQ_OPS = [*INT8_OPS, "Relu", "MaxPool"]
CALIBRATION_BATCH = 64                  # images per batch fed to the int8 calibrator


def fp32_ends(onnx_path) -> list[str]:
    """The first and the last INT8_OPS node: kept in fp32, as usual for int8 CNNs. The first conv
    sees 3 input channels (int8 gains nothing there) and the last layer makes the logits
    (effect measured: docs/measurements.md)."""
    import onnx

    names = [n.name for n in onnx.load(str(onnx_path)).graph.node if n.op_type in INT8_OPS]
    return [names[0], names[-1]] if len(names) > 2 else []


def _onnxruntime_int8(model, example, calibration) -> Predict:
    """Static QDQ int8 of ``model`` with batch norm folded into every quantized convolution
    (:func:`fold_batchnorm`). The first convolution's block stays as it is: that conv is an fp32
    end, and folded its max-pool would run on u8 in NCHW (ORT's slow path: 4.0 of 13.7 ms at batch
    64). Measured against quantizing the model as trained: docs/backends-measurements.md §14."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    fp32 = export_onnx(fold_batchnorm(model, keep=(first_conv,)), example)
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
                            reduce_range=reduce_range, op_types_to_quantize=QDQ_OPS,
                            nodes_to_exclude=fp32_ends(prepared), activation_type=getattr(QuantType, activations),
                            weight_type=getattr(QuantType, weights))
        prepared.unlink()
        print(f"backends: int8 quantization ({activations} x {weights}{', reduce_range' * reduce_range}, "
              f"{len(calibration)} calibration images) in {time.perf_counter() - start:.1f}s", flush=True)
    return _ort_session(out)


# ONNX Runtime's int8 kernels for the INT8_OPS, as its optimizer fuses DequantizeLinear -> op -> QuantizeLinear.
ORT_INT8_KERNELS = {"QLinearConv", "QGemm", "QLinearMatMul", "ConvInteger", "MatMulInteger",
                    "MatMulIntegerToFloat", "DynamicQuantizeMatMul"}


def ort_int8_problem(quantized, optimized) -> str | None:
    """Why the optimized graph ``optimized`` (what ONNX Runtime runs) computes fewer of the QDQ
    model ``quantized``'s quantized layers (an INT8_OPS node whose weights a DequantizeLinear makes) in int8
    kernels than there are, or None. Both are onnx ModelProtos."""
    dequantized = {o for n in quantized.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    # quantized layers: their weights (input 1) are dequantized; an fp32 end may read dequantized activations
    expected = sum(1 for n in quantized.graph.node
                   if n.op_type in INT8_OPS and len(n.input) > 1 and n.input[1] in dequantized)
    ran = [n.op_type for n in optimized.graph.node if n.op_type in ORT_INT8_KERNELS]
    if expected and len(ran) >= expected:
        return None
    fp32 = sorted({n.op_type for n in optimized.graph.node if n.op_type in INT8_OPS})
    return (f"claims int8 but ONNX Runtime's optimized graph has {len(ran)} int8 kernels for the {expected} "
            f"layers quantized in the model; the rest run {', '.join(fp32) or 'nothing'} between "
            "DequantizeLinear/QuantizeLinear (int8 simulated in fp32)")


def _ort_int8_kernels(predict: Predict, x: torch.Tensor, fp32_model: nn.Module) -> str | None:
    """The graph ONNX Runtime optimizes the measured file into (same options as the measured
    session: components/ort.py), checked by :func:`ort_int8_problem`. One graph per file, whatever
    the probe batch (prepare checks two)."""
    return _ort_file_int8_problem(predict.exported)


@cache
def _ort_file_int8_problem(path: Path) -> str | None:
    """:func:`ort_int8_problem` of the int8 file ``path`` (named by its weights' and calibration's
    digests, written whole: its content never changes under that name)."""
    import onnx

    from components import ort

    optimized = path.with_name(f".{path.stem}.{os.getpid()}.optimized.onnx")
    try:
        ort.session(path, 1, optimized_to=optimized)
        return ort_int8_problem(onnx.load(str(path)), onnx.load(str(optimized)))
    finally:
        optimized.unlink(missing_ok=True)


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()[:12]


# --------------------------------------------------------------------------- PyTorch int8 (PT2E)

def pt2e_fp32_ends(model: nn.Module) -> list[str]:
    """The first conv and the last linear layer (module names): kept in fp32, as fp32_ends does
    for ONNX Runtime int8."""
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return [n for n in (convs[:1] + linears[-1:])]


def _pt2e_quantizer(model: nn.Module):
    """PyTorch's inductor int8 quantizer (torchao's PT2E X86InductorQuantizer) with its default
    config: u8 activations calibrated by histogram (the range that minimizes the quantization
    error, not the raw min/max), s8 per-channel weights. Without VNNI (int8_types' reduce_range)
    the config keeps activations to 7 bits, so AVX2's saturating u8 x s8 pairs stay exact (ORT
    narrows the weights instead). On three gtsrb-dev models the histogram kept accuracy within
    0.12–0.29 points of fp32 where min/max calibration lost 0.53–0.73
    (docs/backends-measurements.md).

    The same config on arm64: torchao's ArmInductorQuantizer (torchao 0.18) quantizes weights per
    tensor, and torchao's inductor passes only rewrite per-channel weights into oneDNN's int8
    kernels (``dequantize_per_channel_weight_pattern`` in torchao's inductor_passes/x86.py), so
    its model would run fp32 convolutions between quantize/dequantize steps. Whether the oneDNN
    build of this torch has int8 kernels for this CPU, :func:`_int8_between_fp32_ends` checks when
    the backend is prepared."""
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86

    config = x86.get_default_x86_inductor_quantization_config(reduce_range=int8_types()[2])
    quantizer = x86.X86InductorQuantizer().set_global(config)
    for name in pt2e_fp32_ends(model):
        quantizer.set_module_name_qconfig(name, None)
    return quantizer


class _ChannelAffine(nn.Module):
    """An eval-mode BatchNorm2d as what it computes: x * scale + shift per channel."""

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
        self.register_buffer("scale", scale.view(1, -1, 1, 1))
        self.register_buffer("shift", (bn.bias.detach() - bn.running_mean * scale).view(1, -1, 1, 1))

    def forward(self, x):
        return x * self.scale + self.shift


def fold_batchnorm(model: nn.Module, keep: tuple[nn.Module, ...] = ()) -> nn.Module:
    """The eval-mode ``model`` with its BatchNorm2d layers folded into the convolutions (in place;
    the same function up to float rounding). A block (nn.Sequential) holding a layer of ``keep``
    is left as it is:

    - conv -> BN -> ReLU becomes conv' -> ReLU (torch's ``fuse_conv_bn_eval``);
    - conv -> max-pool -> BN -> ReLU (SignNet's blocks) becomes conv' -> ReLU -> max-pool when
      every channel's BN scale (gamma / sqrt(var + eps)) is positive: a positive per-channel
      affine map and ReLU are both monotone, so they commute with the max;
    - any other BatchNorm2d becomes its per-channel affine (:class:`_ChannelAffine`).

    For PT2E int8 this leaves each block one quantized conv with ReLU fused and a u8 output that
    the max-pool and the next conv read as they are, instead of conv -> u8 -> max-pool ->
    dequantize -> affine -> ReLU -> quantize: one rounding of the activations per block instead
    of two. On three gtsrb-dev models, top-1 agreement with fp32 went from 98.97-99.47 % to
    99.71-99.84 % and batch 64 ran 7-10 % faster (docs/backends-measurements.md). It also spares
    ``convert_pt2e`` its own conv-BN folding, which traces dozens of patterns (~1 min here)."""
    kept = [m for m in model.modules() if isinstance(m, nn.Sequential) and any(k in list(m) for k in keep)]
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential) and m not in kept]:
        layers = list(seq)
        kinds = [type(m) for m in layers]
        if kinds == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]:
            folded = [fuse_conv_bn_eval(layers[0], layers[1]), layers[2]]
        elif kinds == [nn.Conv2d, nn.MaxPool2d, nn.BatchNorm2d, nn.ReLU] and bool((layers[2].weight > 0).all()):
            conv, pool, bn, relu = layers
            folded = [fuse_conv_bn_eval(conv, bn), relu, pool]
        else:
            continue
        del seq[:]
        seq.extend(folded)
    for child in [m for m in model.modules() if m not in kept]:
        for attr, grandchild in list(child.named_children()):
            if isinstance(grandchild, nn.BatchNorm2d):
                setattr(child, attr, _ChannelAffine(grandchild))
    return model


def _pt2e_int8(model, example, calibration) -> Predict:
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    start = time.perf_counter()
    model = flatten_channels_last(fold_batchnorm(model), example)
    batch = torch.export.Dim("batch", min=1, max=4096)
    # An example of batch 1 would specialise the batch dimension to 1 (torch.export's 0/1 rule).
    example = example if len(example) > 1 else example.expand(2, *example.shape[1:]).contiguous()
    exported = torch.export.export(model, (_nhwc(example),), dynamic_shapes=({0: batch},)).module()
    observed = prepare_pt2e(exported, _pt2e_quantizer(model))
    with torch.no_grad():
        for i in range(0, len(calibration), CALIBRATION_BATCH):
            observed(calibration[i:i + CALIBRATION_BATCH])
    quantized = convert_pt2e(observed)
    print(f"backends: PT2E int8 quantization ({len(calibration)} calibration images) in "
          f"{time.perf_counter() - start:.1f}s", flush=True)
    # Channels-last input: the first convolution reads it so; from torch's NCHW, inductor's
    # standardize-and-quantize kernel wrote it transposed, one scalar at a time (0.48 -> 0.05 ms
    # of batch 64 on the AMX Xeon; the conversion costs 0.07 ms).
    return _compiled(quantized, prepare_input=_nhwc)


# --------------------------------------------------------------------------- availability
def _no_mkldnn() -> str | None:
    return None if torch.backends.mkldnn.is_available() else "this torch build has no oneDNN (mkldnn)"


def _no_bf16() -> str | None:
    reason = _no_mkldnn()
    if reason or torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return reason
    need = ("the bf16 extension (bf16 in Features)" if ARM
            else "AVX-512 (avx512bw/vl/dq; avx512_bf16/amx_bf16 in hardware)")
    return (f"this CPU lacks {need}, so oneDNN has no bf16 kernels for it: bf16 would be emulated "
            "element by element, slower than fp32; nothing to gain")


def _no_compiler() -> str | None:
    from torch._inductor import config

    compiler = config.cpp.cxx[0] if isinstance(config.cpp.cxx, tuple) and config.cpp.cxx[0] else "g++"
    return None if shutil.which(compiler) else f"no C++ compiler ({compiler}) on PATH for inductor's CPU codegen"


def _no_pt2e() -> str | None:
    reason = _no_mkldnn() or _no_compiler()
    if reason:
        return reason
    try:
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer  # noqa: F401
    except ImportError as e:
        return f"PyTorch's PT2E int8 quantizers live in torchao, which cannot be imported ({e})"
    return None


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
            f"on {'/'.join(INT8_OPS)}, first and last layer fp32 ({why}); batch norm folded into the "
            "quantized convolutions, whose ReLU and max-pool run on u8 too")


BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("eager", "fp32, oneDNN off: ATen's native kernels"
            + (" with OpenBLAS (the learning path's 'OpenBLAS')" if ARM else " (MKL/NNPACK)"),
            "torch.backends.mkldnn.enabled = False", "fp32", _eager),
    Backend("onednn", "fp32, oneDNN on, NCHW"
            + (" with Arm Compute Library (the learning path's 'ACL')" if ARM else ""),
            "torch.backends.mkldnn.enabled = True (the default)", "fp32", _onednn, _no_mkldnn),
    Backend("onednn-bf16", "bf16, oneDNN on, NHWC: bf16 weights and activations (fp32 accumulation), logits "
            "returned as fp32",
            "model.to(torch.bfloat16, memory_format=torch.channels_last); x.to(torch.bfloat16, ...)",
            "bf16", _onednn_bf16, _no_bf16, kernels=_all_bf16),
    Backend("channels-last", "fp32, oneDNN on, NHWC (channels_last) weights and input",
            "model.to(memory_format=torch.channels_last); x.contiguous(memory_format=torch.channels_last)",
            "fp32", _channels_last, _no_mkldnn),
    Backend("torchscript", "fp32, traced + frozen TorchScript, oneDNN on (BN folded, oneDNN layouts)",
            "torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(model, x)))",
            "fp32", _torchscript, _no_mkldnn),
    Backend("compile", "fp32, torch.compile inductor CPU codegen with frozen weights (C++/OpenMP + oneDNN) "
            "on the channels-last model (NHWC input, flatten in (H, W, C) order)",
            "torch.compile(flatten_channels_last(model).to(memory_format=torch.channels_last), dynamic=False) "
            "with torch._inductor.config.freezing = True; "
            "cache: TORCHINDUCTOR_CACHE_DIR",
            "fp32", _compile, _no_compiler),
    Backend("compile-bf16", "bf16, torch.compile inductor with frozen weights on the bf16 NHWC model "
            "(oneDNN bf16 convolutions, fused C++ elementwise code)",
            "torch.compile(flatten_channels_last(model).to(torch.bfloat16, memory_format=torch.channels_last), "
            "dynamic=False) "
            "with torch._inductor.config.freezing = True",
            "bf16", _compile_bf16, lambda: _no_bf16() or _no_compiler(), kernels=_all_bf16),
    Backend("onnxruntime", "fp32, ONNX export (torch.export-based) run by ONNX Runtime's CPU execution provider",
            "torch.onnx.export(dynamo) -> onnxruntime.InferenceSession(CPUExecutionProvider)",
            "fp32", _onnxruntime, _no_onnxruntime, exports="onnx"),
    Backend("onnxruntime-int8", "int8, ONNX Runtime static quantization (QDQ, per-channel weights) calibrated "
            "on training images: " + _int8_description(),
            "BN folded into the quantized convs -> onnxruntime.quantization.quantize_static(QDQ, MinMax "
            "calibration) -> CPUExecutionProvider",
            "int8", _onnxruntime_int8, _no_quantizer, needs_calibration=True, exports="onnx",
            kernels=_ort_int8_kernels),
    Backend("pt2e-int8", "int8, PyTorch's own: PT2E static quantization (torchao's X86InductorQuantizer config, "
            "histogram calibration on training images, per-channel s8 weights, first and last layer fp32) "
            "lowered by torch.compile to oneDNN int8 kernels, channels-last input",
            "BN folded into the convs, flatten in (H, W, C) order -> torch.export -> torchao prepare_pt2e / "
            "convert_pt2e -> torch.compile with freezing",
            "int8", _pt2e_int8, _no_pt2e, needs_calibration=True, kernels=_int8_between_fp32_ends),
)}


def get(name: str) -> Backend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}") from None


def unknown_backends(names: list[str]) -> str | None:
    """Why a list of backend names (run-local, submit, bench) names backends that do not exist, or None."""
    unknown = [n for n in names if n not in BACKENDS]
    return f"unknown backend(s) {unknown}; known: {', '.join(BACKENDS)}" if unknown else None
