"""The backend registry: every backend computes the eager model's function, or says why it cannot run."""

import collections
import copy
import dataclasses
import warnings

import pytest
import torch

from components import backends
from components.backends import BACKENDS, Backend, BackendUnavailable, int8_types
from components.evaluate import load_eval_data
from components.model import calibration_images, load_model_artifact

ISSUE_BACKENDS = {"eager", "onednn", "onednn-bf16", "torchscript", "channels-last", "compile", "onnxruntime",
                  "onnxruntime-int8"}
FAST_FP32 = ["onednn", "channels-last", "torchscript"]
SLOW_FP32 = ["compile", "onnxruntime"]      # inductor compilation / ONNX export take seconds


@pytest.fixture(scope="module")
def model_and_batch(trained_model, prepared):
    data = load_eval_data(trained_model, prepared)
    return data.model, data.x[:64].contiguous(), data.calibration


def test_registry_names_every_backend_of_the_issue_with_its_facts():
    assert ISSUE_BACKENDS <= set(BACKENDS)
    assert backends.REFERENCE == "eager" and BACKENDS["eager"].precision == "fp32"
    for name, spec in BACKENDS.items():
        assert spec.name == name
        assert spec.description and spec.enabled_by
        assert spec.precision in {"fp32", "bf16", "int8"}
        reason = spec.unavailable()
        assert reason is None or (isinstance(reason, str) and len(reason) > 10), name
    assert {n: s.precision for n, s in BACKENDS.items() if s.precision != "fp32"} == {
        "onednn-bf16": "bf16", "compile-bf16": "bf16", "onnxruntime-int8": "int8", "pt2e-int8": "int8"}
    assert [n for n, s in BACKENDS.items() if s.needs_calibration] == ["onnxruntime-int8", "pt2e-int8"]


def test_unknown_backend_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown backend 'tpu'; known: eager, onednn"):
        backends.get("tpu")


def test_an_unavailable_backend_refuses_to_prepare_and_says_why(model_and_batch):
    model, x, _ = model_and_batch
    spec = Backend("fancy", "d", "e", "fp32", lambda m, e, c: m, unavailable=lambda: "needs a fancy unit")
    with pytest.raises(BackendUnavailable, match="'fancy' is unavailable here: needs a fancy unit"):
        spec.prepare(model, x)


def test_bf16_availability_is_torchs_own_hardware_check():
    supported = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    reason = BACKENDS["onednn-bf16"].unavailable()
    assert (reason is None) == supported
    if not supported:
        assert "bf16 would be emulated" in reason


def _check_same_function(name, model, x):
    reference = backends.get("eager").prepare(model, x)
    spec = backends.get(name)
    assert spec.unavailable() is None, f"{name} must run here (its dependencies are ours): {spec.unavailable()}"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    predict = spec.prepare(model, x)
    for batch in (x, x[:1].contiguous()):
        got, want = predict(batch), reference(batch)
        assert got.dtype == torch.float32 and got.shape == want.shape == (len(batch), 43)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "prepare must not change the caller's model"
    assert all(p.is_contiguous() for p in model.parameters()), "channels-last must not convert the caller's model"


@pytest.mark.parametrize("name", FAST_FP32)
def test_fp32_backends_compute_the_eager_logits(name, model_and_batch):
    _check_same_function(name, *model_and_batch[:2])


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW_FP32)
def test_compiled_and_exported_backends_compute_the_eager_logits(name, model_and_batch):
    _check_same_function(name, *model_and_batch[:2])


def test_eager_and_onednn_really_switch_onednn_and_do_not_warn(model_and_batch):
    model, x, _ = model_and_batch
    seen = []
    with backends.onednn(False):
        seen.append(torch.backends.mkldnn.enabled)
        with backends.onednn(True):
            seen.append(torch.backends.mkldnn.enabled)
        seen.append(torch.backends.mkldnn.enabled)
    assert seen == [False, True, False]
    assert torch.backends.mkldnn.enabled is True
    with warnings.catch_warnings():
        warnings.simplefilter("error")      # the old torch.backends.mkldnn.flags() warned about TF32 per call
        for name in ("eager", "onednn"):
            backends.get(name).prepare(model, x)(x)


def test_int8_needs_calibration_images(model_and_batch):
    model, x, _ = model_and_batch
    with pytest.raises(ValueError, match="needs calibration images"):
        backends.get("onnxruntime-int8").prepare(model, x)


@pytest.mark.slow
def test_int8_onnxruntime_keeps_the_predictions(model_and_batch, trained_model):
    model, x, calibration = model_and_batch
    _, card = load_model_artifact(trained_model)
    assert torch.equal(calibration, calibration_images(trained_model, card)), "the artifact's own sample"
    predict = backends.get("onnxruntime-int8").prepare(model, x, calibration=calibration)
    got, want = predict(x), backends.get("eager").prepare(model, x)(x)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert not torch.equal(got, want), "int8 arithmetic gives (slightly) different logits"
    assert (got.argmax(1) == want.argmax(1)).float().mean() >= 0.95
    assert (got - want).abs().max() < 0.1 * want.abs().max()


@pytest.mark.parametrize("arm, flags, reduce_range", [
    (False, {"avx2", "fma"}, True),
    (False, {"avx2", "fma", "avx512f", "avx512_vnni"}, False),
    (False, {"avx2", "avx_vnni"}, False),
    (False, {"amx_int8", "avx512f"}, False),
    (True, {"asimd", "asimddp"}, False),
    (True, {"asimd"}, False),
])
def test_int8_weights_use_7_bits_only_without_an_int32_dot_product(arm, flags, reduce_range):
    activations, weights, chosen, why = int8_types(arm, flags)
    assert (activations, weights, chosen) == ("QUInt8", "QInt8", reduce_range) and why
    if arm:
        assert ("asimddp: u8 x s8 dot products" in why) == ("asimddp" in flags)
        assert ("without dot-product instructions" in why) == ("asimddp" not in flags)


def test_int8_keeps_the_first_and_last_layer_in_fp32(model_and_batch, tmp_path):
    import onnx

    model, x, _ = model_and_batch
    path = backends.export_onnx(model, x)
    nodes = [n for n in onnx.load(str(path)).graph.node if n.op_type in backends.INT8_OPS]
    assert len(nodes) > 2
    assert backends.fp32_ends(path) == [nodes[0].name, nodes[-1].name]
    assert nodes[0].op_type == "Conv" and nodes[-1].op_type in ("Gemm", "MatMul")
    tiny = tmp_path / "tiny.onnx"       # nothing left to quantize if both ends were excluded
    graph = onnx.helper.make_graph(nodes[:2], "g", [], [])
    onnx.save(onnx.helper.make_model(graph), str(tiny))
    assert backends.fp32_ends(tiny) == []


def test_an_onnx_backend_names_the_one_self_contained_file_it_runs(model_and_batch):
    """What the evaluate step copies into its served artifact: the file the session was made from,
    whole (no partial export, no external ".data" weights beside it)."""
    model, x, _ = model_and_batch
    predict = backends.get("onnxruntime").prepare(model, x)
    assert predict.exported == backends.export_onnx(model, x) and predict.exported.is_file()
    assert not [p.name for p in predict.exported.parent.iterdir() if p.name.startswith(".") or p.suffix == ".data"]
    assert backends.get("onnxruntime").exports == backends.get("onnxruntime-int8").exports == "onnx"
    assert not [n for n, b in backends.BACKENDS.items() if b.exports and not n.startswith("onnxruntime")]


def test_onnx_runtime_sessions_have_a_fixed_thread_count_and_do_not_spin(tmp_path):
    import numpy as np
    from onnx import TensorProto, helper, save

    from components import ort

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])
    save(helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])),
         str(tmp_path / "relu.onnx"))
    run = ort.session(tmp_path / "relu.onnx", 2)
    options = run.session.get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (2, 1)
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert run(np.array([[-1.0, 0.0, 2.0]])).tolist() == [[0.0, 0.0, 2.0]]


# --------------------------------------------------------------------------- precision checks
def _bf16(model, x):
    """The model really computed in bf16 (ATen's bf16 kernels exist on every CPU, fast or not)."""
    with torch.inference_mode():
        return copy.deepcopy(model).to(torch.bfloat16)(x.to(torch.bfloat16)).float()


def _int8_weights(model):
    """fp32 model whose conv / linear weights are rounded to 255 per-channel levels: int8 rounding."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d | torch.nn.Linear):
                scale = m.weight.abs().amax(dim=tuple(range(1, m.weight.dim())), keepdim=True) / 127
                m.weight.copy_((m.weight / scale).round().clamp(-127, 127) * scale)
    return model


def test_the_precision_check_rejects_fp32_in_disguise_and_accepts_real_rounding(model_and_batch):
    model, x, _ = model_and_batch
    with torch.inference_mode():
        fp32 = model(x)
        reordered = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
        int8ish = _int8_weights(model)(x)
    model.to(memory_format=torch.contiguous_format)
    assert backends.relative_error(fp32, fp32) == 0.0 and 0 < backends.relative_error(reordered, fp32) < 1e-5
    for claimed in ("bf16", "int8"):
        for disguise in (fp32, reordered):                   # fp32 outputs, whatever the kernels
            problem = backends.precision_problem(claimed, disguise, fp32)
            assert problem.startswith(f"claims {claimed} but its logits differ from fp32 by") and "in fp32" in problem
    real = _bf16(model, x)
    assert backends.REDUCED_FLOOR * 4 < backends.relative_error(real, fp32) < backends.REDUCED_CEILING / 4
    assert backends.precision_problem("bf16", real, fp32) is None
    assert backends.precision_problem("int8", int8ish, fp32) is None
    assert backends.precision_problem("fp32", reordered, fp32) is None
    assert "differ from fp32 by" in backends.precision_problem("fp32", real, fp32)   # fp32 that is bf16: rejected
    assert "computes a different function" in backends.precision_problem("int8", torch.zeros_like(fp32), fp32)
    assert "not all finite" in backends.precision_problem("bf16", torch.full_like(fp32, float("nan")), fp32)
    with pytest.raises(ValueError, match="unknown precision 'int4'"):
        backends.precision_problem("int4", fp32, fp32)


def test_a_backend_never_reports_a_precision_it_did_not_compute_in(model_and_batch):
    model, x, _ = model_and_batch
    disguised = Backend("fake-bf16", "d", "e", "bf16", lambda m, e, c: m)
    with pytest.raises(backends.PrecisionNotComputed, match="'fake-bf16' claims bf16 but .* it computed in fp32"):
        disguised.prepare(model, x)
    honest = Backend("real-bf16", "d", "e", "bf16", lambda m, e, c: lambda b: _bf16(m, b))
    assert honest.prepare(model, x)(x).dtype == torch.float32
    mislabelled = Backend("fp32-that-is-bf16", "d", "e", "fp32", lambda m, e, c: lambda b: _bf16(m, b))
    with pytest.raises(backends.PrecisionNotComputed, match="differ from fp32"):
        mislabelled.prepare(model, x)


def _inference(fn):
    def run(x):
        with torch.inference_mode():
            return fn(x)
    return run


def test_reduced_precision_simulated_in_fp32_is_caught_by_what_ran(model_and_batch):
    """Rounding in the right places passes the numbers (the logits land in the bf16/int8 band) but
    not the kernels check: the convolutions and matrix products ran fp32 kernels."""
    model, x, _ = model_and_batch
    int8_grid = Backend("fake-int8", "d", "e", "int8", lambda m, e, c: _inference(_int8_weights(m)),
                        kernels=backends._int8_between_fp32_ends)
    bf16_inputs = Backend("fake-bf16", "d", "e", "bf16", lambda m, e, c: _inference(lambda b: m(b.bfloat16().float())),
                          kernels=backends._all_bf16)
    for fake, precision in ((int8_grid, "int8"), (bf16_inputs, "bf16")):
        with torch.inference_mode():
            got, fp32 = fake.build(copy.deepcopy(model), x, None)(x), model(x)
        assert backends.precision_problem(precision, got, fp32) is None          # the numbers alone pass it
        with pytest.raises(backends.PrecisionNotComputed, match=rf"'{fake.name}' claims {precision} but only 0 of "
                           rf"the \d+ convolutions/matrix products .* ran aten::.* on float .*simulated in fp32"):
            fake.prepare(model, x)
    real = dataclasses.replace(bf16_inputs, name="real-bf16", build=lambda m, e, c: lambda b: _bf16(m, b))
    assert real.prepare(model, x)(x).dtype == torch.float32
    ran = backends.kernels_run(lambda b: _bf16(model, b), x)
    assert len(ran) == len(backends._layers(model)) and {dtype for _, dtype in ran} == {"c10::BFloat16"}


def test_kernel_problem_counts_the_layers_that_ran_in_the_precision():
    ran = [("mkldnn::_convolution_pointwise", "float"), ("onednn::qconv_pointwise", "unsigned char"),
           ("onednn::qlinear_pointwise", "unsigned char"), ("mkl::_mkl_linear", "float")]
    assert backends.kernel_problem("int8", ran, 2) is None
    problem = backends.kernel_problem("int8", ran, 3)
    assert problem.startswith("claims int8 but only 2 of the 3 convolutions/matrix products")
    assert "mkl::_mkl_linear on float" in problem and "mkldnn::_convolution_pointwise on float" in problem
    assert "only 0 of the 4" in backends.kernel_problem("bf16", ran, 4)
    layer_ops = ("aten::conv2d", "aten::convolution", "aten::mkldnn_convolution", "mkldnn::_convolution_pointwise",
                 "onednn::qconv_pointwise", "onednn::qconv2d_pointwise", "quantized::conv2d_relu", "aten::linear",
                 "mkl::_mkl_linear", "onednn::qlinear_pointwise", "quantized::linear", "aten::addmm", "aten::mm")
    assert all(backends._arithmetic(op) for op in layer_ops)
    other_ops = ("prims::convert_element_type", "aten::relu", "quantized::max_pool2d", "aten::_to_copy", "aten::norm")
    assert not any(backends._arithmetic(op) for op in other_ops)


def test_a_backend_honest_at_its_batch_but_not_at_batch_1_is_rejected(model_and_batch):
    model, x, _ = model_and_batch
    split = Backend("bf16-but-not-at-1", "d", "e", "bf16",
                    lambda m, e, c: lambda b: _bf16(m, b) if len(b) > 1 else _inference(m)(b))
    with pytest.raises(backends.PrecisionNotComputed, match=r"computed in fp32 \(batch 1\)"):
        split.prepare(model, x)


def _qdq_graphs(fused: bool):
    """A one-conv QDQ model as quantize_static writes it, and what ONNX Runtime's optimizer made of
    it: QLinearConv when it fused the DequantizeLinear -> Conv -> QuantizeLinear, else the same Conv."""
    from onnx import helper

    def graph(nodes):
        return helper.make_model(helper.make_graph(nodes, "g", [], []))
    quantized = graph([helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["x"]),
                       helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"]),
                       helper.make_node("Conv", ["x", "w"], ["y"]),
                       helper.make_node("Conv", ["y", "w2"], ["logits"])])     # an fp32 end
    qconv = ["xq", "s", "z", "wq", "ws", "wz", "ys", "yz"]
    ran = (helper.make_node("QLinearConv", qconv, ["y"], domain="com.microsoft") if fused
           else helper.make_node("Conv", ["x", "w"], ["y"]))
    return quantized, graph([ran, helper.make_node("Conv", ["y", "w2"], ["logits"])])


def test_onnxruntime_int8_must_run_int8_kernels_for_every_quantized_layer():
    assert backends.ort_int8_problem(*_qdq_graphs(fused=True)) is None
    problem = backends.ort_int8_problem(*_qdq_graphs(fused=False))
    assert problem == ("claims int8 but ONNX Runtime's optimized graph has 0 int8 kernels for the 1 layers "
                       "quantized in the model; the rest run Conv between DequantizeLinear/QuantizeLinear "
                       "(int8 simulated in fp32)")
    # an fp32 end reading dequantized activations (its weights fp32) is not a quantized layer
    from onnx import helper
    quantized, optimized = _qdq_graphs(fused=True)
    quantized.graph.node[3].input[0] = "yd"
    quantized.graph.node.append(helper.make_node("DequantizeLinear", ["yq", "s", "z"], ["yd"]))
    assert backends.ort_int8_problem(quantized, optimized) is None


def runnable(name: str) -> Backend:
    """The backend as registered, or, where this CPU has no native kernels for its precision (bf16
    without AVX-512), the same backend with the availability check lifted: PyTorch then emulates
    bf16, slowly but in bf16, so the code that runs on bf16 CPUs runs, and is checked, here too."""
    spec = backends.get(name)
    return spec if spec.unavailable() is None else dataclasses.replace(spec, unavailable=lambda: None)


def test_onednn_bf16_computes_in_bf16(model_and_batch):
    model, x, _ = model_and_batch
    predict = runnable("onednn-bf16").prepare(model, x)      # passes its own precision check
    with torch.inference_mode():
        fp32 = model(x)
    got = predict(x)
    assert got.dtype == torch.float32
    assert backends.REDUCED_FLOOR < backends.relative_error(got, fp32) < 0.05
    assert (got.argmax(1) == fp32.argmax(1)).float().mean() >= 0.95


@pytest.mark.slow
@pytest.mark.parametrize("name", ["compile-bf16", "pt2e-int8"])
def test_compiled_reduced_precision_backends_keep_the_predictions(name, model_and_batch):
    model, x, calibration = model_and_batch
    spec = runnable(name) if name.endswith("bf16") else backends.get(name)
    if spec.unavailable():
        pytest.skip(spec.unavailable())
    predict = spec.prepare(model, x, calibration if spec.needs_calibration else None)
    with torch.inference_mode():
        fp32 = model(x)
    for batch in (x, x[:1].contiguous()):
        assert predict(batch).shape == (len(batch), 43)
    got = predict(x)
    assert backends.REDUCED_FLOOR < backends.relative_error(got, fp32) < 0.1
    assert (got.argmax(1) == fp32.argmax(1)).float().mean() >= 0.95
    reduced = [op for op, dtype in backends.kernels_run(predict, x) if dtype in backends.KERNEL_DTYPES[spec.precision]]
    ends = backends.pt2e_fp32_ends(model) if spec.precision == "int8" else []
    assert len(reduced) == len(backends._layers(model)) - len(ends)     # LPNet: 2 convs + 2 linears


@pytest.mark.slow
def test_pt2e_with_per_tensor_weights_is_not_lowered_to_int8_and_says_so(model_and_batch, monkeypatch):
    """torchao's ArmInductorQuantizer config (per-tensor weights): its convolutions stay fp32
    between quantize/dequantize steps, as they would on arm64; the backend is rejected, not run
    as 'int8'."""
    from torchao.quantization.pt2e.quantizer import arm_inductor_quantizer as arm

    model, x, calibration = model_and_batch
    spec = backends.get("pt2e-int8")
    if spec.unavailable():
        pytest.skip(spec.unavailable())
    monkeypatch.setattr(backends, "_pt2e_quantizer", lambda m: arm.ArmInductorQuantizer().set_global(
        arm.get_default_arm_inductor_quantization_config()))
    with pytest.raises(backends.PrecisionNotComputed, match=r"'pt2e-int8' claims int8 but only 0 of the 2 "
                       r"convolutions/matrix products .*on float .*\(int8 simulated in fp32\)"):
        spec.prepare(model, x, calibration)


def test_pt2e_keeps_the_first_conv_and_the_last_linear_in_fp32(model_and_batch):
    model, _, _ = model_and_batch
    assert backends.pt2e_fp32_ends(model) == ["conv1", "fc2"]          # LPNet
    from components.model import SignNet
    assert backends.pt2e_fp32_ends(SignNet()) == ["features.1.0", "head.5"]


def _with_running_stats(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """``model`` in eval mode with BN statistics and affine parameters away from their defaults."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return model.eval()


def _folded_same_function(model: torch.nn.Module) -> torch.nn.Module:
    """fold_batchnorm(model), checked to compute model's function on random images."""
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        before = model(x)
        folded = backends.fold_batchnorm(copy.deepcopy(model))
        after = folded(x)
    assert (after - before).abs().max() < 1e-4 * before.abs().max()
    return folded


def test_folding_batchnorm_keeps_the_function_and_leaves_no_batchnorm():
    from components.model import SignNet
    folded = _folded_same_function(_with_running_stats(SignNet()))
    kinds = [[type(m).__name__ for m in block] for block in folded.features[1:]]
    assert kinds == [["Conv2d", "ReLU", "MaxPool2d"]] * 3 + [["Conv2d", "ReLU"]]
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, backends._ChannelAffine)) for m in folded.modules())
    assert backends.pt2e_fp32_ends(folded) == ["features.1.0", "head.5"]


def test_a_negative_batchnorm_scale_is_not_moved_past_the_max_pool():
    """max(a, b) * s = min(a * s, b * s) for s < 0: that block keeps its order, BN as an affine."""
    from components.model import SignNet
    model = _with_running_stats(SignNet())
    model.features[2][2].weight.data[5] = -0.7
    folded = _folded_same_function(model)
    assert [type(m).__name__ for m in folded.features[2]] == ["Conv2d", "MaxPool2d", "_ChannelAffine", "ReLU"]
    assert [type(m).__name__ for m in folded.features[1]] == ["Conv2d", "ReLU", "MaxPool2d"]


def test_onnxruntime_int8_runs_each_signnet_block_in_int8_with_nothing_fp32_between(tmp_path):
    """Batch norm folded into the quantized convolutions, ReLU and max-pool quantized: ONNX Runtime
    runs QLinearConv -> u8 max-pool -> QLinearConv, with one DequantizeLinear left (before the fp32
    last layer); the first block (an fp32 end) keeps its fp32 max-pool."""
    import onnx

    from components import ort
    from components.model import SignNet
    model = _with_running_stats(SignNet())
    g = torch.Generator().manual_seed(2)
    x, calibration = torch.randn(8, 3, 32, 32, generator=g), torch.randn(128, 3, 32, 32, generator=g)
    predict = backends.get("onnxruntime-int8").prepare(model, x, calibration=calibration)
    ort.session(predict.exported, 1, optimized_to=tmp_path / "optimized.onnx")
    ran = collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)
    assert (ran["QLinearConv"], ran["QGemm"], ran["DequantizeLinear"]) == (3, 1, 1), ran
    assert ran["BatchNormalization"] == 0 and ran["NhwcMaxPool"] == 2 and ran["MaxPool"] == 1, ran
    with torch.inference_mode():
        assert (predict(x).argmax(1) == model(x).argmax(1)).float().mean() >= 0.75


def test_flattening_channels_last_keeps_the_function_and_makes_the_flatten_a_view():
    from components.model import LPNet, SignNet
    model = _with_running_stats(SignNet())
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        before = model(x)
        nhwc = backends.flatten_channels_last(copy.deepcopy(model), x)
        assert (nhwc(x) - before).abs().max() < 1e-5 * before.abs().max()
        assert isinstance(nhwc.head[0], backends._FlattenChannelsLast)
        assert not any(isinstance(m, torch.nn.Flatten) for m in nhwc.modules())
        features = nhwc.features(x.contiguous(memory_format=torch.channels_last))
        assert features.is_contiguous(memory_format=torch.channels_last)
        assert nhwc.head[0](features).data_ptr() == features.data_ptr()       # a view, no transpose
    lp = LPNet().eval()          # flattens with torch.flatten in forward(): nothing to rewrite
    assert backends.flatten_channels_last(copy.deepcopy(lp), x).state_dict().keys() == lp.state_dict().keys()


@pytest.mark.slow
def test_pt2e_int8_runs_signnet_channels_last_and_keeps_its_predictions():
    """SignNet through PT2E: three int8 convolutions and the hidden linear layer in int8 (the first
    conv and the head fp32), on channels-last input, the flatten's column order matching."""
    from components.model import SignNet
    spec = backends.get("pt2e-int8")
    if spec.unavailable():
        pytest.skip(spec.unavailable())
    model = _with_running_stats(SignNet())
    g = torch.Generator().manual_seed(2)
    x, calibration = torch.randn(16, 3, 32, 32, generator=g), torch.randn(128, 3, 32, 32, generator=g)
    predict = spec.prepare(model, x, calibration=calibration)
    int8 = backends.KERNEL_DTYPES["int8"]
    ran = collections.Counter(op for op, dtype in backends.kernels_run(predict, x) if dtype in int8)
    assert sum(ran.values()) == len(backends._layers(model)) - 2, ran
    with torch.inference_mode():
        fp32 = model(x)
    got = predict(x)
    assert backends.REDUCED_FLOOR < backends.relative_error(got, fp32) < 0.1
    assert (got.argmax(1) == fp32.argmax(1)).float().mean() >= 0.75


def test_folding_can_leave_the_block_of_a_given_layer_as_it_is():
    from components.model import SignNet
    model = _with_running_stats(SignNet())
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        before = model(x)
    kept = copy.deepcopy(model)
    backends.fold_batchnorm(kept, keep=(kept.features[1][0],))
    assert [type(m).__name__ for m in kept.features[1]] == ["Conv2d", "MaxPool2d", "BatchNorm2d", "ReLU"]
    assert [[type(m).__name__ for m in b] for b in kept.features[2:]] == [["Conv2d", "ReLU", "MaxPool2d"]] * 2 + [
        ["Conv2d", "ReLU"]]
    with torch.inference_mode():
        assert (kept(x) - before).abs().max() < 1e-4 * before.abs().max()
