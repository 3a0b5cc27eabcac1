"""The serving package in-process (components/serving): artifact checks, the training transforms, V1/V2 answers, top-k,
validation of every instance, and what a multi-worker server ships to its workers."""

import base64
import contextlib
import io
import itertools
import json
import os
import pickle
import random
import shutil
import struct
import time
import types
import zlib

import numpy as np
import pytest
import torch
from fastapi import FastAPI
from kserve import InferInput, InferRequest, InferResponse
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import RequestedOutput
from PIL import Image

from components import backends, transforms
from components.model import (
    CARD_FILE,
    CLASS_NAMES,
    ModelArtifactError,
    calibration_images,
    load_model_artifact,
    normalize,
    to_uint8_32,
)
from components.serving import protocol, server
from components.serving.__main__ import main as serving_main
from components.serving.model import GTSRBModel, batch_buckets
from tests.synthetic import sign_image

BACKEND = backends.REFERENCE


@pytest.fixture(scope="module")
def model(trained_model):
    return GTSRBModel("gtsrb", str(trained_model), BACKEND, max_batch=4)


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def v1(*instances, **parameters) -> dict:
    body = {"instances": list(instances)}
    if parameters:
        body["parameters"] = parameters
    return body


def image_instance(data: bytes) -> dict:
    return {"image": {"b64": b64(data)}}


def reference_logits(trained_model, images: list[Image.Image]) -> torch.Tensor:
    """The training/evaluation path: to_uint8_32 -> normalize -> network."""
    net, card = load_model_artifact(trained_model)
    x = normalize(torch.stack([to_uint8_32(i) for i in images]), card["normalization"]["mean"],
                  card["normalization"]["std"])
    with torch.no_grad():
        return net(x)


# --------------------------------------------------------------------------- loading
def test_refuses_weights_that_do_not_match_the_card(tampered_model):
    with pytest.raises(ModelArtifactError, match="does not match the model card"):
        GTSRBModel("gtsrb", str(tampered_model), BACKEND)


def test_refuses_an_artifact_other_than_the_expected_one(trained_model):
    with pytest.raises(ModelArtifactError, match="not the expected"):
        GTSRBModel("gtsrb", str(trained_model), BACKEND, expected_sha256="0" * 64)


def test_refuses_an_unknown_backend(trained_model):
    with pytest.raises(ValueError, match="unknown backend"):
        GTSRBModel("gtsrb", str(trained_model), "no-such-backend")


def test_the_command_refuses_a_body_limit_below_one_byte(trained_model, capsys):
    assert serving_main(["--model_dir", str(trained_model), "--backend", BACKEND, "--max_body_bytes", "0"]) == 1
    err = capsys.readouterr().err
    assert "refusing to serve" in err and "max_body_bytes must be >= 1, got 0" in err


@pytest.mark.slow
def test_every_available_backend_serves_what_it_computes_in_process(trained_model, served_onnx):
    """The served answer is the registry backend's own output (ONNX Runtime: from the file its
    preparation wrote, int8 calibrated with the model artifact's own calibration sample, as every
    evaluation is); fp32 backends all agree with eager."""
    images = [encode(sign_image(label, random.Random(label)), "PNG") for label in (0, 14, 33)]
    classes = {}
    for name, spec in backends.BACKENDS.items():
        if spec.unavailable():   # only the hardware can make a backend unavailable (bf16 needs CPU support)
            assert spec.precision == "bf16", f"{name}: {spec.unavailable()}"
            continue
        served = GTSRBModel("gtsrb", str(served_onnx.get(name, trained_model)), name, max_batch=1)
        batches = [served.preprocess(v1(image_instance(i))) for i in images]
        answers = [served.predict(b)["predictions"][0] for b in batches]
        net, card = load_model_artifact(trained_model)
        calibration = calibration_images(trained_model, card) if spec.needs_calibration else None
        run = spec.prepare(net, torch.zeros(1, 3, 32, 32), calibration=calibration)
        expected = [torch.softmax(run(torch.from_numpy(b.x)), dim=1)[0] for b in batches]
        assert [a["class_id"] for a in answers] == [int(e.argmax()) for e in expected], name
        assert [a["probability"] for a in answers] == pytest.approx([float(e.max()) for e in expected], abs=1e-5)
        classes[name] = [a["class_id"] for a in answers]
    fp32 = [n for n in classes if backends.get(n).precision == "fp32"]
    assert len(fp32) >= 2 and all(classes[n] == classes[BACKEND] for n in fp32), classes


def test_a_torch_backend_does_not_need_the_calibration_sample(uncalibrated_model):
    assert GTSRBModel("gtsrb", str(uncalibrated_model), BACKEND).ready


def test_a_changed_calibration_sample_refuses_to_start(trained_model, tmp_path):
    changed = tmp_path / "changed-model"
    shutil.copytree(trained_model, changed)
    card = json.loads((changed / CARD_FILE).read_text())
    sample = changed / card["calibration"]["file"]
    torch.save(torch.zeros(4, 3, 32, 32, dtype=torch.uint8), sample)
    with pytest.raises(ModelArtifactError, match="calibration.pt: sha256 .* does not match the model card"):
        GTSRBModel("gtsrb", str(changed), BACKEND)


def test_requests_are_padded_to_the_warmed_batch_buckets(model):
    assert batch_buckets(4) == model.buckets == [1, 2, 4]
    assert batch_buckets(1) == [1] and batch_buckets(6) == [1, 2, 4, 6]
    seen = []
    run = model._run
    model._run = lambda x: (seen.append(len(x)), run(x))[1]
    try:
        one = [encode(sign_image(5, random.Random(5)), "PPM")]
        three = model.predict(model.preprocess(v1(*(image_instance(one[0]) for _ in range(3)))))
        single = model.predict(model.preprocess(v1(image_instance(one[0]))))
    finally:
        model._run = run
    assert seen == [4, 1]
    for prediction in three["predictions"]:                            # padding never leaks into answers
        assert prediction["class_id"] == single["predictions"][0]["class_id"]
        assert prediction["probability"] == pytest.approx(single["predictions"][0]["probability"], abs=1e-5)


# --------------------------------------------------------------------------- V1
@pytest.mark.parametrize("fmt", ["PNG", "PPM", "JPEG"])
def test_encoded_images_of_any_size_get_the_training_transform(model, trained_model, fmt):
    rng = random.Random(7)
    images = [sign_image(label, rng).resize(size) for label, size in ((3, (25, 31)), (14, (120, 90)), (40, (32, 32)))]
    encoded = [encode(i, fmt) for i in images]
    decoded = [Image.open(io.BytesIO(e)) for e in encoded]      # JPEG is lossy: compare with what was sent
    answer = model.predict(model.preprocess(v1(*(image_instance(e) for e in encoded[:3]), top_k=3)))
    probabilities = torch.softmax(reference_logits(trained_model, decoded), dim=1)
    for prediction, expected in zip(answer["predictions"], probabilities, strict=True):
        assert prediction["class_id"] == int(expected.argmax())
        assert prediction["class_name"] == CLASS_NAMES[prediction["class_id"]]
        assert prediction["probability"] == pytest.approx(float(expected.max()), abs=1e-5)
        top = prediction["top_k"]
        assert [t["class_id"] for t in top] == expected.topk(3).indices.tolist()
        assert [t["probability"] for t in top] == sorted((t["probability"] for t in top), reverse=True)


def test_pngs_with_the_metadata_and_frames_editors_write_are_answered(model):
    """The PNG chunk limits (256 besides image data, 8 compressed, 256 KiB of text) leave what
    real files carry: text, XMP, an ICC profile, EXIF, a 20-frame animation (its first frame)."""
    from PIL import ImageCms, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for i in range(5):
        info.add_text(f"k{i}", "v" * 1000, zip=i % 2 == 0)
    info.add_itxt("XML:com.adobe.xmp", "<x/>" * 5000, zip=True)
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    rich, animated = io.BytesIO(), io.BytesIO()
    sign = sign_image(14, random.Random(1))
    sign.save(rich, format="PNG", pnginfo=info, icc_profile=icc, exif=Image.Exif())
    frames = [sign_image(label, random.Random(label)).resize((40, 40)) for label in range(20)]
    frames[0].save(animated, format="PNG", save_all=True, append_images=frames[1:])
    answer = model.predict(model.preprocess(v1(image_instance(rich.getvalue()), image_instance(animated.getvalue()))))
    plain = model.predict(model.preprocess(v1(image_instance(encode(sign, "PNG")),
                                              image_instance(encode(frames[0], "PNG")))))
    assert answer == plain                        # the same pixels: the metadata and later frames change nothing


def adam7_png(image: Image.Image) -> bytes:
    """``image`` (RGB) as an interlaced PNG: Adam7's seven passes, each row filter 0 (PIL writes no
    interlaced PNG)."""
    pixels = np.asarray(image.convert("RGB"))
    rows = b""
    for x0, y0, dx, dy in ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
                           (0, 1, 1, 2)):
        sub = pixels[y0::dy, x0::dx]
        if sub.size:
            rows += b"".join(b"\0" + row.tobytes() for row in sub)

    def chunk(kind, data):
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")
    header = struct.pack(">IIBBBBB", image.width, image.height, 8, 2, 0, 0, 1)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


def test_valid_pngs_and_pnms_of_every_kind_pass_the_file_checks(model):
    """The file checks (chunk CRCs, palette, tRNS, image data inflating to exactly the rows; PNM
    header and maxval) refuse broken files only: interlaced, palette (with and without
    transparency), 1-bit, grey + alpha, 16-bit PNGs and PGM/PPMs of other maxvals are answered, the
    interlaced one as its plain twin."""
    sign = sign_image(12, random.Random(12)).resize((37, 29))
    plain = model.predict(model.preprocess(v1(image_instance(encode(sign, "PNG")))))
    assert model.predict(model.preprocess(v1(image_instance(adam7_png(sign))))) == plain
    palette = sign.convert("P", palette=Image.Palette.ADAPTIVE, colors=7)
    transparent = io.BytesIO()
    palette.save(transparent, format="PNG", transparency=3)
    grey16 = Image.fromarray(np.asarray(sign.convert("L"), dtype=np.uint16) * 257)
    images = [encode(palette, "PNG"), transparent.getvalue(), encode(sign.convert("1"), "PNG"),
              encode(sign.convert("LA"), "PNG"), encode(grey16, "PNG"), encode(sign.convert("RGBA"), "PNG"),
              b"P5 2 2 100\n" + bytes([0, 50, 100, 7]), b"P5 1 2 1000\n" + (1000).to_bytes(2, "big") * 2,
              b"P6\n# a comment\n1 1\n# another\n255\n" + bytes(3),
              b"P6 1# a comment after a number\n 1 255\n" + bytes(3), b"P4 8 1\n\xf0"]
    for data in images:
        (prediction,) = model.predict(model.preprocess(v1(image_instance(data))))["predictions"]
        assert 0 <= prediction["class_id"] < 43 and 0 < prediction["probability"] <= 1, data[:20]


def test_a_multi_picture_jpeg_is_answered_for_its_first_picture(model):
    """An MPO (a camera's stereo or preview JPEG: an APP2 "MPF" index of a few entries) passes the
    MPF entry limit and is answered as its first picture."""
    first, second = sign_image(3, random.Random(3)), sign_image(9, random.Random(9))
    mpo = io.BytesIO()
    first.save(mpo, format="MPO", save_all=True, append_images=[second], quality=95)
    assert b"MPF\0" in mpo.getvalue()
    single = io.BytesIO()
    first.save(single, format="JPEG", quality=95)
    assert model.predict(model.preprocess(v1(image_instance(mpo.getvalue())))) == \
        model.predict(model.preprocess(v1(image_instance(single.getvalue()))))


def test_a_cmyk_jpeg_counts_twice_its_pixels(model):
    """A 4096x4096 CMYK progressive JPEG took 0.69 s and +210 MB (a coefficient plane per component,
    then PIL's conversion to RGB): its pixels count twice in the request's budget."""
    big, small = io.BytesIO(), io.BytesIO()
    Image.new("CMYK", (3000, 3000), (10, 20, 30, 40)).save(big, format="JPEG", quality=10)
    with pytest.raises(protocol.RequestTooLarge, match=r"a 3000x3000 CMYK JPEG \(four components, converted to "
                                                       r"RGB: it counts as 18000000 pixels\)"):
        model.preprocess(v1(image_instance(big.getvalue())))
    sign_image(14, random.Random(3)).convert("CMYK").save(small, format="JPEG", quality=95)
    opened = Image.open(io.BytesIO(small.getvalue()))
    assert protocol.decode_cost(opened, small.getvalue(), None)[0] == 2 * opened.width * opened.height
    as_rgb = encode(opened.convert("RGB"), "PNG")              # the pixels the transform makes of it
    answer = model.predict(model.preprocess(v1(image_instance(small.getvalue()))))
    assert answer == model.predict(model.preprocess(v1(image_instance(as_rgb))))


def test_real_gtsrb_images_match_the_evaluation_path(model, trained_model, sample_dir):
    files = sorted((sample_dir / "gtsrb" / "GTSRB" / "Final_Test" / "Images").glob("*.ppm"))[:4]
    images = [Image.open(f) for f in files]
    answer = model.predict(model.preprocess(v1(*(image_instance(f.read_bytes()) for f in files))))
    expected = reference_logits(trained_model, images).argmax(1).tolist()
    assert [p["class_id"] for p in answer["predictions"]] == expected


def test_a_normalized_array_answers_like_its_image(model):
    body = v1(image_instance(encode(sign_image(25, random.Random(1)), "PNG")))
    batch = model.preprocess(body)
    from_image = model.predict(batch)["predictions"][0]
    from_array = model.predict(model.preprocess(v1(batch.x[0].tolist())))["predictions"][0]
    assert from_array["class_id"] == from_image["class_id"]
    assert from_array["probability"] == pytest.approx(from_image["probability"], abs=1e-6)


def test_client_normalized_values_must_be_in_the_range_of_a_normalized_image(model):
    """What the training transform makes of pixels 0 and 255 passes (and 1 % of the range beyond, a
    client's rounding); further out is refused naming the channel, the value, the range and the
    card's mean and std. Finite values far outside would otherwise reach the network: 3.4e38
    overflows an fp32 model's per-image statistics into NaN scores."""
    normalizer = model.signature.normalizer
    black, white = (np.broadcast_to(v.reshape(3, 1, 1), (3, 32, 32)) for v in (normalizer.low, normalizer.high))
    for edge in (black, white):
        assert model.predict(model.preprocess(v1(edge.tolist())))["predictions"][0]["probability"] > 0
    span = normalizer.high - normalizer.low
    assert model.preprocess(v1((white + 0.009 * span.reshape(3, 1, 1)).tolist())).x.shape == (1, 3, 32, 32)
    too_dark = black.copy()
    too_dark[1, 4, 4] -= 0.02 * span[1]
    mean = ", ".join(f"{m:.4f}" for m in normalizer.mean)
    low, high = normalizer.low[1], normalizer.high[1]
    with pytest.raises(InvalidInput, match=rf"instances\[1\]: channel 1 holds {too_dark[1, 4, 4]:.6g}, outside "
                                           rf"\[{low:.4f}, {high:.4f}\]: .* mean \[{mean}\]"):
        model.preprocess(v1(black.tolist(), too_dark.tolist()))
    pixels = np.arange(256, dtype=np.uint8).repeat(12)[:3072].reshape(1, 3, 32, 32)
    normalized = transforms.normalize(pixels, normalizer.mean, normalizer.std)
    assert normalized.min() >= normalizer.low.min() - 1e-6 and normalized.max() <= normalizer.high.max() + 1e-6
    model.preprocess(v1(normalized[0].tolist()))


def test_a_model_that_gives_non_finite_scores_is_a_server_fault_never_an_answer(model):
    """Validated input that still yields NaN or inf is our bug: predict raises (a 500 with its
    traceback), it never answers 200 with probabilities that are not numbers."""
    batch = model.preprocess(v1(image_instance(encode(sign_image(5, random.Random(5)), "PNG"))))
    run = model._run
    model._run = lambda x: np.full((len(x), len(CLASS_NAMES)), np.nan, dtype=np.float32)
    try:
        with pytest.raises(RuntimeError, match="non-finite scores for a validated batch of 1"):
            model.predict(batch)
    finally:
        model._run = run
    assert model.predict(batch)["predictions"][0]["probability"] > 0


def test_a_json_body_sent_with_another_content_type_is_parsed(model):
    body = v1(image_instance(encode(sign_image(2, random.Random(2)), "PPM")))
    assert model.predict(model.preprocess(json.dumps(body).encode())) == model.predict(model.preprocess(body))


# --------------------------------------------------------------------------- V2
def test_v2_bytes_and_fp32_inputs(model):
    png = encode(sign_image(9, random.Random(3)), "PNG")
    request = InferRequest("gtsrb", [InferInput("image", [2], "BYTES", [b64(png), b64(png)])], request_id="r1",
                           parameters={"top_k": 2})
    response = model.predict(model.preprocess(request))
    outputs = {o.name: o for o in response.outputs}
    assert response.id == "r1" and response.model_name == "gtsrb"
    assert outputs["class_id"].shape == [2] and outputs["top_k_class_id"].shape == [2, 2]
    assert outputs["class_name"].data == [CLASS_NAMES[c] for c in outputs["class_id"].data]
    assert outputs["top_k_class_id"].data[0] == outputs["class_id"].data[0]
    rest, _ = response.to_rest()
    assert [o["name"] for o in rest["outputs"]] == list(protocol.V2_OUTPUTS)

    x = model.preprocess(v1(image_instance(png))).x
    request = InferRequest("gtsrb", [InferInput("input", [1, 3, 32, 32], "FP32", x.flatten().tolist())],
                           request_outputs=[RequestedOutput("class_id"), RequestedOutput("probability")])
    rest, _ = model.predict(model.preprocess(request)).to_rest()
    assert [o["name"] for o in rest["outputs"]] == ["class_id", "probability"]     # only what was asked for
    assert rest["outputs"][0]["data"] == outputs["class_id"].data[:1]
    assert rest["outputs"][1]["data"][0] == pytest.approx(outputs["probability"].data[0], abs=1e-6)

    tagged = InferRequest("gtsrb", [InferInput("image", [1], "BYTES", [b64(png)],
                                               parameters={"content_type": "base64"})])
    assert model.predict(model.preprocess(tagged)).outputs[0].data == outputs["class_id"].data[:1]  # MLServer-style

    request = v2(parameters={"binary_data_output": True})           # KServe's binary extension for outputs
    raw, json_length = model.predict(model.preprocess(request)).to_rest()
    header = json.loads(raw[:json_length])
    assert [o["parameters"]["binary_data_size"] for o in header["outputs"]][:1] == [8]   # one INT64 class id


# --------------------------------------------------------------------------- validation
GOOD = b64(encode(sign_image(1, random.Random(0)), "PNG"))
ZEROS = [[[0.0] * 32 for _ in range(32)] for _ in range(3)]


def with_value(nested: list, position: tuple, value) -> list:
    """A deep copy of ``nested`` with ``value`` at ``position``."""
    copy = json.loads(json.dumps(nested))
    *outer, last = position
    target = copy
    for i in outer:
        target = target[i]
    target[last] = value
    return copy


def v2(name="image", datatype="BYTES", shape=(1,), data=(GOOD,), **request) -> InferRequest:
    return InferRequest("gtsrb", [InferInput(name, list(shape), datatype, list(data))], **request)


BAD_REQUESTS = {
    "body is a list": ([1, 2], "JSON object"),
    "body is not JSON": (b"{not json", "not JSON"),
    "no instances": ({"inputs": []}, "missing key 'instances'"),
    "unknown key": ({"instances": [], "instance": []}, "unknown key"),
    "instances not a list": (v1() | {"instances": {"a": 1}}, "expected a list"),
    "empty instances": (v1(), "no instances"),
    "too many instances": (v1(*[{"image": {"b64": GOOD}}] * 5), "maximum batch of 4"),
    "instance is a string": (v1("x"), "got str"),
    "instance without image": (v1({"b64": GOOD}), "exactly the key 'image'"),
    "image without b64": (v1({"image": {"bytes": GOOD}}), "expected {\"b64\""),
    "b64 not a string": (v1({"image": {"b64": 12}}), "expected a base64 string"),
    "b64 not base64": (v1({"image": {"b64": "%%%"}}), "not valid base64"),
    "b64 empty": (v1({"image": {"b64": ""}}), "zero bytes"),
    "b64 as a data URL": (v1({"image": {"b64": "data:image/png;base64," + GOOD}}),
                          "not valid base64 (.*); send the base64 text alone, without the data: URL prefix"),
    "not an image": (v1({"image": {"b64": b64(b"hello world")}}), "cannot decode image"),
    "truncated png": (v1({"image": {"b64": GOOD[:80]}}), "a PNG cut short"),
    "pfm (float pixels)": (v1({"image": {"b64": b64(b"Pf 4 4 -1.0\n" + bytes(64))}}), "floating-point PFM"),
    "gif": (v1({"image": {"b64": b64(encode(Image.new("RGB", (8, 8)), "GIF"))}}), "not a PNG, JPEG, PPM image"),
    "too large a side": (v1({"image": {"b64": b64(encode(Image.new("1", (5000, 4000)), "PNG"))}}), "a side"),
    "array wrong shape": (v1([[[0.0] * 32] * 32] * 2), "is not [3, 32, 32]"),
    "array ragged": (v1([[[0.0] * 32] * 32, [[0.0] * 31] * 32, [[0.0] * 32] * 32]), "rectangular"),
    "array of strings": (v1([[["0"] * 32] * 32] * 3), 'instances[0][0][0][0]: expected a number, got "0"'),
    "array of booleans": (v1([[[True] * 32] * 32] * 3), "instances[0][0][0][0]: expected a number, got true"),
    "array, first value a boolean": (v1(with_value(ZEROS, (0, 0, 0), True)),
                                     "instances[0][0][0][0]: expected a number, got true"),
    "array, one boolean among numbers": (v1(ZEROS, with_value(ZEROS, (2, 31, 5), False)),
                                         "instances[1][2][31][5]: expected a number, got false"),
    "array with null": (v1(with_value(ZEROS, (1, 2, 3), None)), "instances[0][1][2][3]: expected a number, got null"),
    "array with an object": (v1(with_value(ZEROS, (0, 0, 1), {"v": 1})),
                             'instances[0][0][0][1]: expected a number, got {"v":1}'),
    "array with an object JSON cannot echo": (v1(with_value(ZEROS, (0, 0, 2), {"v": 10**30})),
                                              "instances[0][0][0][2]: expected a number, got a dict"),
    "array, a string among numbers": (v1(with_value(ZEROS, (2, 31, 31), "0.5")),
                                      'instances[0][2][31][31]: expected a number, got "0.5"'),
    "array, a string in place of a row": (v1() | {"instances": [[[[0.0] * 32] * 32] * 2 + ["x"]]}, "rectangular"),
    "array with NaN": (v1([[[float("nan")] * 32] * 32] * 3), "NaN"),
    "array of raw 0..255 pixels": (v1([[[255.0] * 32] * 32] * 3),
                                   r"instances[0]: channel 0 holds 255, outside [-"),
    "v2 fp32 values the network would overflow on": (v2("input", "FP32", (1, 3, 32, 32), [3.4e38] * 3072),
                                                     "channel 0 holds 3.4e.38, outside"),
    "top_k zero": (v1({"image": {"b64": GOOD}}) | {"parameters": {"top_k": 0}}, "top_k"),
    "top_k string": (v1({"image": {"b64": GOOD}}) | {"parameters": {"top_k": "3"}}, '1..43, got "3"'),
    "top_k null": (v1({"image": {"b64": GOOD}}) | {"parameters": {"top_k": None}}, "1..43, got null"),
    "top_k true": (v1({"image": {"b64": GOOD}}) | {"parameters": {"top_k": True}}, "1..43, got true"),
    "unknown parameter": (v1({"image": {"b64": GOOD}}) | {"parameters": {"k": 3}}, "unknown parameter"),
    "v1 binary outputs": (v1({"image": {"b64": GOOD}}) | {"parameters": {"binary_data_output": True}},
                          "unknown parameter"),
    "v2 binary flag not bool": (v2(parameters={"binary_data_output": "yes"}), "true or false"),
    "v2 an input parameter outside the protocol": (
        InferRequest("gtsrb", [InferInput("image", [1], "BYTES", [GOOD], parameters={"shared_memory_region": "r"})]),
        "input 'image': unknown parameter.s. ['shared_memory_region']; known: ['binary_data_size', 'content_type']"),
    "v2 content_type not a string": (
        InferRequest("gtsrb", [InferInput("image", [1], "BYTES", [GOOD], parameters={"content_type": 5})]),
        "input 'image'.parameters.content_type: expected a string, got 5"),
    "v2 two inputs": (InferRequest("gtsrb", [InferInput("image", [1], "BYTES", [GOOD])] * 2), "exactly one input"),
    "v2 unknown input": (v2(name="pixels"), "unknown input"),
    "v2 wrong datatype": (v2(datatype="INT8"), "datatype INT8 is not BYTES"),
    "v2 shape vs data": (v2(shape=(2,)), "does not match"),
    "v2 negative shape": (v2("input", "FP32", (-1, 3, 32, 32), [0.0] * 3072), "shape [-1, 3, 32, 32] has a negative"),
    "v2 bytes not string": (v2(data=(5,)), "expected a base64 string"),
    "v2 fp32 shape": (v2("input", "FP32", (1, 3, 16, 16), [0.0] * 768), "is not [N, 3, 32, 32]"),
    "v2 fp32 values": (v2("input", "FP32", (1, 3, 32, 32), [0.0] * 100), "do not fill shape"),
    "v2 fp32 a boolean among numbers": (v2("input", "FP32", (1, 3, 32, 32), [0.5] * 7 + [True] + [0.5] * 3064),
                                        "input 'input' data[7]: expected a number, got true"),
    "v2 fp32 nested, a boolean": (v2("input", "FP32", (1, 3, 32, 32), [with_value(ZEROS, (2, 0, 9), False)]),
                                  r"input 'input' data[0][2][0][9]: expected a number, got false"),
    "v2 fp32 a string among numbers": (v2("input", "FP32", (1, 3, 32, 32), [0.5] * 3071 + ["0.5"]),
                                       'input \'input\' data[3071]: expected a number, got "0.5"'),
    "v2 fp32 an integer beyond 64 bits": (v2("input", "FP32", (1, 3, 32, 32), [0] * 9 + [10**30] + [0] * 3062),
                                          "input 'input' data[9]: an integer of 100 bits, outside the 64-bit range"),
    "v2 fp32 infinity": (v2("input", "FP32", (1, 3, 32, 32), [float("inf")] * 3072), "NaN or infinity"),
    "v2 too many": (v2(shape=(5,), data=[GOOD] * 5), "maximum batch"),
    "v2 unknown output": (v2(request_outputs=[RequestedOutput("logits")]), "unknown output"),
    "v2 an output twice": (v2(request_outputs=[RequestedOutput("class_id"), RequestedOutput("probability"),
                                               RequestedOutput("class_id")]),
                           "output 'class_id': requested more than once"),
    "v2 top-k output without top_k": (v2(request_outputs=[RequestedOutput("top_k_class_id")]),
                                      "output 'top_k_class_id': needs parameters.top_k"),
}


@pytest.mark.parametrize("payload, message", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_requests_are_invalid_input_saying_what_is_wrong(model, payload, message):
    with pytest.raises(InvalidInput, match=message.replace("[", r"\[").replace("{", r"\{")):
        model.preprocess(payload)


def mutated(data: bytes, rng: random.Random) -> bytes:
    """One libFuzzer-style mutation: flip, overwrite, insert, delete, duplicate or truncate."""
    data, at = bytearray(data), rng.randrange(len(data))
    kind = rng.randrange(6)
    if kind == 0:
        data[at] ^= 1 << rng.randrange(8)
    elif kind == 1:
        data[at:at + 4] = rng.choice([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x7f\xff\xff\xff"])
    elif kind == 2:
        data[at:at] = rng.randbytes(rng.randrange(1, 16))
    elif kind == 3:
        del data[at:at + rng.randrange(1, 64)]
    elif kind == 4:
        data[at:at] = data[rng.randrange(len(data)):][:rng.randrange(1, 64)]
    else:
        del data[at:]
    return bytes(data)


@pytest.mark.filterwarnings("ignore::UserWarning:PIL.TiffImagePlugin")   # corrupt EXIF: PIL skips the tag
def test_mutated_images_are_refused_or_decoded_never_a_crash(model):
    """A fixed sample of what atheris ran 2 million of (docs/serving-hardening.md): PNG, JPEG and PPM
    seeds in several modes, with EXIF orientation, mutated; each is an InvalidInput or a finite
    3x32x32 row, never another exception (which the server would answer 500)."""
    rng = random.Random(12)
    exif = Image.Exif()
    exif[0x0112] = 6
    sign = sign_image(7, rng).resize((9, 7))
    seeds = [encode(sign, "PPM"), encode(sign.convert("L"), "PPM"), encode(sign.convert("P"), "PNG"),
             encode(sign.convert("RGBA"), "PNG"), encode(sign.convert("I;16"), "PNG"), encode(sign, "JPEG"),
             encode(sign.convert("L"), "JPEG")]
    for fmt in ("PNG", "JPEG"):
        buffer = io.BytesIO()
        sign.save(buffer, fmt, exif=exif)
        seeds.append(buffer.getvalue())
    outcomes = {"refused": 0, "decoded": 0}
    for i in range(3000):
        data = seeds[i % len(seeds)]
        for _ in range(rng.randrange(1, 4)):
            data = mutated(data, rng) or data
        try:
            x = model.preprocess(v1(image_instance(data))).x
        except InvalidInput:
            outcomes["refused"] += 1
            continue
        assert x.shape == (1, 3, 32, 32) and np.isfinite(x).all()
        outcomes["decoded"] += 1
    assert min(outcomes.values()) > 300, outcomes           # both paths exercised


def test_a_boolean_is_named_even_where_it_is_not_the_first_value(model):
    """numpy turns [0.5, true] into float64 [0.5, 1.0]: the value check must look at each element."""
    good = with_value(ZEROS, (1, 1, 1), 1)                 # ints are numbers
    assert model.preprocess(v1(good)).x.shape == (1, 3, 32, 32)


def png_of_size(width: int, height: int) -> str:
    return b64(encode(Image.new("1", (width, height)), "PNG"))


def test_the_pixel_budget_counts_every_image_of_a_request(model, monkeypatch):
    """The budget is per request: images that pass alone are refused together (413), from their
    headers, before any of them is decoded; a request exactly at the budget passes."""
    import dataclasses

    sig = dataclasses.replace(model.signature, max_pixels=3 * 64 * 64)
    decoded = []
    monkeypatch.setattr(protocol, "decode_image", lambda image, where, out, normalizer: decoded.append(where))
    at_budget = v1(*[{"image": {"b64": png_of_size(64, 64)}}] * 3)
    assert protocol.parse_request(at_budget, sig).x.shape == (3, 3, 32, 32) and len(decoded) == 3
    decoded.clear()
    over = v1(*[{"image": {"b64": png_of_size(64, 64)}}] * 3, {"image": {"b64": png_of_size(1, 1)}})
    with pytest.raises(protocol.RequestTooLarge, match=r"instances\[3\].image.b64: a 1x1 image brings the request "
                                                        r"to 12289 decoded pixels, more than the limit of 12288"):
        protocol.parse_request(over, sig)
    v2_over = v2(shape=(2,), data=[png_of_size(100, 100), png_of_size(100, 100)])
    with pytest.raises(protocol.RequestTooLarge, match=r"input 'image' data\[1\]: a 100x100 image .* 20000 decoded"):
        protocol.parse_request(v2_over, sig)
    assert decoded == []
    # the server's default: one 4096x4096 image, or 64 instances of 512x512
    assert protocol.MAX_REQUEST_PIXELS == model.signature.max_pixels == 4096 * 4096
    with pytest.raises(protocol.RequestTooLarge, match="limit of 16777216 pixels per request"):
        model.preprocess(v1(*[{"image": {"b64": png_of_size(4096, 4096)}}] * 2))
    assert decoded == []


# --------------------------------------------------------------------------- multi-worker shipping
def test_workers_get_settings_not_weights_and_load_when_their_server_starts(model, monkeypatch):
    app = FastAPI()
    monkeypatch.setattr(server.model_server, "app", app)
    shipped = pickle.dumps(model)
    assert len(shipped) < 10_000                          # no tensors, no prepared backend
    worker = pickle.loads(shipped)
    assert worker.ready is False and not hasattr(worker, "_run")
    assert worker.load in app.router.on_startup           # loads (and verifies) at server start
    assert any(m.cls is server.RequestGuard for m in app.user_middleware)
    assert worker.server == model.server
    worker.load()
    body = v1(image_instance(base64.b64decode(GOOD)))
    assert worker.ready and worker.predict(worker.preprocess(body)) == model.predict(model.preprocess(body))


@pytest.mark.parametrize("request_logs", [False, True])
def test_the_per_request_timing_middleware_goes_with_the_request_logs(monkeypatch, request_logs):
    """KServe adds timing_asgi's middleware when its server starts; without request logs the
    predictor removes it at startup (it only feeds the silenced trace log) and requests still work."""
    from fastapi.testclient import TestClient
    from kserve.protocol.rest.server import PrintTimings
    from timing_asgi import TimingMiddleware

    app = FastAPI()
    monkeypatch.setattr(server.model_server, "app", app)
    server.ServerSettings(request_logs=request_logs).apply()
    app.add_middleware(TimingMiddleware, client=PrintTimings(), metric_namer=lambda scope: "kserve.io")
    app.add_api_route("/", lambda: {"status": "alive"})
    with TestClient(app) as client:                      # runs the startup hooks
        assert client.get("/").json() == {"status": "alive"}
        assert client.post("/", content=b"x" * 10).status_code == 405       # through the request guard
    kept = [m.cls for m in app.user_middleware]
    assert (TimingMiddleware in kept) is request_logs
    assert server.RequestGuard in kept


def test_a_v2_json_body_is_parsed_once_by_the_guard_and_fastapi_gets_that_object(monkeypatch):
    """FastAPI would parse a V2 JSON body again with json.loads (8x slower than orjson for a
    tensor of numbers); it gets the guard's object. What orjson refuses (NaN) is refused, never parsed again."""

    import starlette.requests
    from fastapi import Body
    from fastapi.testclient import TestClient

    app = FastAPI()
    monkeypatch.setattr(server.model_server, "app", app)
    server.ServerSettings().apply()
    stdlib = []
    monkeypatch.setattr(starlette.requests, "json", types.SimpleNamespace(
        loads=lambda body: stdlib.append(body) or json.loads(body)))
    seen = []

    async def infer(model_name: str, body: dict = Body(...)):
        seen.append(body)
        return {"model": model_name}
    app.add_api_route("/v2/models/{model_name}/infer", infer, methods=["POST"])
    tensor = {"name": "input", "datatype": "FP32", "shape": [1, 3], "data": [0.1, -2.5e-7, 3]}
    with TestClient(app) as client:
        assert client.post("/v2/models/m/infer", json={"inputs": [tensor]}).json() == {"model": "m"}
        assert seen == [{"inputs": [tensor]}] and type(seen[0]["inputs"][0]["data"][2]) is int
        assert stdlib == []
        nan = b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1], "data": [NaN]}]}'
        refused = client.post("/v2/models/m/infer", content=nan, headers={"Content-Type": "application/json"})
        assert refused.status_code == 400 and "NaN, Infinity, lone surrogates" in refused.json()["error"]
        assert stdlib == [] and len(seen) == 1


def test_a_body_that_stops_arriving_is_a_408_and_never_reaches_the_app():
    """A declared body that stops half way held its buffer (up to the 8 MiB limit) for good."""
    import asyncio

    async def app(scope, receive, send):
        raise AssertionError("the app must not see a request whose body never arrived")

    guard = server.RequestGuard(app, max_body_bytes=1000, body_timeout_s=0.2)
    parts = [{"type": "http.request", "body": b'{"instances": ', "more_body": True}]

    async def receive():
        if parts:
            return parts.pop()
        await asyncio.sleep(3600)

    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/models/gtsrb:predict", "query_string": b"",
             "headers": [(b"content-type", b"application/json"), (b"content-length", b"100")]}
    start = time.monotonic()
    asyncio.run(guard(scope, receive, send))
    assert 0.15 < time.monotonic() - start < 3
    assert sent[0]["status"] == 408 and (b"connection", b"close") in sent[0]["headers"]
    assert json.loads(sent[1]["body"]) == {"error": "the request body stopped arriving: nothing for 0.2 seconds "
                                                     "after 14 bytes"}


def guarded_read(parts: list[tuple[float, bytes]], body_timeout_s: float) -> tuple[list, list]:
    """Run the request guard on a body sent as ``parts`` (delay before each, bytes), the last one
    ending it: (what the app received, what the guard answered)."""
    import asyncio

    received, sent, due = [], [], []

    async def app(scope, receive, send):
        received.append((await receive())["body"])

    async def receive():              # as uvicorn's: cancelled while it waits, it takes nothing
        loop = asyncio.get_running_loop()
        if not due:                   # each part arrives at a fixed time, whoever waits for it
            for delay, _ in parts:
                due.append((due[-1] if due else loop.time()) + delay)
        await asyncio.sleep(max(0.0, due[len(due) - len(parts)] - loop.time()))
        _, data = parts.pop(0)
        return {"type": "http.request", "body": data, "more_body": bool(parts)}

    async def send(message):
        sent.append(message)

    guard = server.RequestGuard(app, max_body_bytes=1 << 20, body_timeout_s=body_timeout_s)
    scope = {"type": "http", "method": "POST", "path": "/v1/models/gtsrb:predict", "query_string": b"",
             "headers": [(b"content-type", b"application/json")]}
    asyncio.run(guard(scope, receive, send))
    return received, sent


def test_a_body_read_late_by_a_busy_worker_is_read_whole_and_a_trickle_is_a_408():
    """The body timeout was on the whole body: a worker busy with other requests reads a large
    body late, and a valid 7.9 MB body was answered 408, blaming the client. Now nothing may stop
    arriving for body_timeout_s, and once the body has taken longer, it must average 1 KiB/s."""
    busy = [(0.05, b"x" * 4096)] * 12                 # 0.6 s in all, 3 x the timeout, never idle for it
    received, sent = guarded_read(busy, body_timeout_s=0.2)
    assert received == [b"x" * 4096 * 12] and sent == []
    trickle = [(0.15, b"x")] * 12                     # never idle for 0.2 s, 7 bytes/s
    received, sent = guarded_read(trickle, body_timeout_s=0.2)
    assert received == [] and sent[0]["status"] == 408
    assert json.loads(sent[1]["body"])["error"].endswith("bytes/s, under the minimum of 1024 bytes/s")


def test_a_body_sent_fast_then_trickled_is_a_408_in_the_next_window():
    """The rate was averaged over the whole body: 8 MB sent at once, then a byte every 20 s, kept
    the average above 1 KiB/s for 8,192 s while the worker held the 8 MB, and only idle time
    counted, so a byte sent before each 1 s wait slice ended was never checked. The rate now holds
    for every window of body_timeout_s of wall time: both are a 408."""
    fast_then_trickle = [(0.0, b"x" * 100_000)] + [(0.15, b"x")] * 12
    received, sent = guarded_read(fast_then_trickle, body_timeout_s=0.2)
    assert received == [] and sent[0]["status"] == 408
    assert json.loads(sent[1]["body"])["error"].endswith("bytes/s, under the minimum of 1024 bytes/s")
    never_idle = [(0.005, b"x")] * 120           # a byte before every wait slice ends: 200 bytes/s of wall time
    received, sent = guarded_read(never_idle, body_timeout_s=0.2)
    assert received == [] and sent[0]["status"] == 408
    steady = [(0.0, b"x" * 100_000)] + [(0.15, b"x" * 400)] * 12    # 2.7 KB/s after the burst: read whole
    received, sent = guarded_read(steady, body_timeout_s=0.2)
    assert received == [b"x" * (100_000 + 400 * 12)] and sent == []


def test_a_body_that_arrives_while_the_worker_is_busy_is_read_whole():
    """A worker's event loop also runs its other requests' preprocessing: blocked for 3x the body
    timeout while the rest of a body arrived, it answered 408 "nothing for 30 seconds" to a client
    that had sent everything. Only time the worker was free to read counts against the client."""
    import asyncio

    received, sent = [], []
    arrived = asyncio.Event()

    async def app(scope, receive, send):
        received.append((await receive())["body"])

    parts = [{"type": "http.request", "body": b"x" * 10, "more_body": True}]

    async def receive():
        if parts:
            return parts.pop()
        await arrived.wait()
        return {"type": "http.request", "body": b"y" * 10, "more_body": False}

    async def send(message):
        sent.append(message)

    async def busy_worker():
        await asyncio.sleep(0.05)
        asyncio.get_running_loop().call_later(0.1, arrived.set)   # the rest arrives during the next 0.6 s
        time.sleep(0.6)                                            # another request's preprocessing

    async def main():
        guard = server.RequestGuard(app, max_body_bytes=1 << 20, body_timeout_s=0.2)
        scope = {"type": "http", "method": "POST", "path": "/v1/models/gtsrb:predict", "query_string": b"",
                 "headers": [(b"content-type", b"application/json")]}
        await asyncio.gather(guard(scope, receive, send), busy_worker())

    asyncio.run(main())
    assert sent == [] and received == [b"x" * 10 + b"y" * 10]


@contextlib.contextmanager
def hardened_uvicorn(app, **limits):
    """A real uvicorn server (httptools) in a thread on a free port of 127.0.0.1, with the parser
    hardening's ``limits`` (timeouts shortened in-process); yields (port, the uvicorn.Server)."""
    import threading

    import uvicorn

    from components.serving import surface
    from components.serving.client import free_port

    surface.harden_http_parser(**limits)
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, http="httptools", log_config=None,
                                       lifespan="off"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not uv.started and time.monotonic() < deadline:
            time.sleep(0.05)
        yield port, uv
    finally:
        uv.should_exit = True
        thread.join(10)
        surface.harden_http_parser()            # the defaults again, for anything later in this process


def test_a_request_head_that_does_not_arrive_in_time_is_a_json_408():
    """uvicorn waited forever for a request head (an idle connection, or a slowloris header): with
    the head timeout shortened in-process, a real uvicorn server answers 408 and closes; a prompt
    request is answered as usual."""
    import socket

    async def app(scope, receive, send):
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

    with hardened_uvicorn(app, head_timeout_s=0.5) as (port, _):
        def exchange(*parts: bytes) -> tuple[bytes, float]:
            start = time.monotonic()
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                for part in parts:
                    s.sendall(part)
                    time.sleep(0.2)
                answer = b""
                while chunk := s.recv(65536):
                    answer += chunk
            return answer, time.monotonic() - start

        for parts in [(), (b"GET / HTTP/1.1\r\nHo", b"st: x\r\nX-Slow: a", b"b", b"c")]:
            answer, seconds = exchange(*parts)
            assert answer.startswith(b"HTTP/1.1 408 ") and 0.4 < seconds < 5, (parts, answer, seconds)
            assert answer.endswith(b'{"error":"the request line and headers did not arrive within 0.5 seconds"}')
        answer, _ = exchange(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200 ") and b"\r\nok\r\n" in answer


def test_a_client_that_does_not_read_its_answers_is_cut_off_after_the_write_timeout(caplog):
    """uvicorn waited forever for a client to read: pipelined requests with large answers, never
    read, held the connection and its requests. With the write timeout shortened in-process, the
    connection is reset once an answer has waited that long, with one WARNING line and no error
    from the pipelined requests still waiting to write; a reading client is answered."""
    import socket

    async def app(scope, receive, send):
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"x" * (4 << 20)})

    with hardened_uvicorn(app, write_timeout_s=0.5) as (port, _):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 4)
            time.sleep(2)                                    # not reading: the server's buffers fill
            got, start = 0, time.monotonic()
            try:
                while chunk := s.recv(1 << 20):
                    got += len(chunk)
            except ConnectionResetError:
                pass
            assert got < 4 * (4 << 20) and time.monotonic() - start < 5      # cut off, not all four answers
        assert [r.getMessage() for r in caplog.records if r.levelname != "INFO"] == [
            "client error: an answer not read for 0.5 s -> connection aborted"]
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := s.recv(1 << 20):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200 ") and answer.count(b"x") >= 4 << 20      # all of it


def test_requests_pipelined_behind_unread_answers_stop_being_read():
    """uvicorn resumed reading after every answer, and each read of tiny pipelined requests queued
    thousands more: a client that pipelined health checks and never read took both workers to
    13.5 GB in 50 s. Reading now stays paused while 16 or more requests wait: the queue stops at
    what one read held and never grows (without the pause: 83,559 after 1 s, 386,934 after 6 s)."""
    import socket
    import threading

    from components.serving.surface import MAX_PIPELINED

    async def app(scope, receive, send):
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok" * 50})

    with hardened_uvicorn(app, write_timeout_s=5) as (port, uv), socket.create_connection(("127.0.0.1", port)) as s:
        block = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 2000
        stop = threading.Event()

        def pipeline():
            with contextlib.suppress(OSError):
                while not stop.is_set():
                    s.sendall(block)
        threading.Thread(target=pipeline, daemon=True).start()
        try:
            queued = []
            for _ in range(4):
                time.sleep(0.75)
                queued.append(max(len(c.pipeline) for c in uv.server_state.connections))
        finally:
            stop.set()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # one read's worth, then no growth (answers written before the client's buffers filled may shrink it)
        assert MAX_PIPELINED < queued[-1] and queued[0] < 20_000, queued
        assert all(later <= earlier for earlier, later in itertools.pairwise(queued)), queued


def test_quiet_logging_drops_only_the_per_request_lines():
    quiet, verbose = server.logging_config(False), server.logging_config(True)
    assert quiet["loggers"]["uvicorn.access"]["level"] == quiet["loggers"]["kserve.trace"]["level"] == "WARNING"
    assert verbose["loggers"]["uvicorn.access"]["level"] == "INFO"
    assert quiet["loggers"]["kserve"] == verbose["loggers"]["kserve"]


@pytest.mark.parametrize("winner", ["onnxruntime-int8", BACKEND])
def test_a_run_local_summary_is_servable_whatever_backend_won(trained_model, served_onnx, tmp_path, winner):
    """`make serve` / `make bench-serve` read summary.json and serve the select step's served
    artifact when the gate promoted it, whichever backend won (an int8 winner: the quantized file
    its evaluation measured). What a kept champion serves: tests/test_local_run.py."""
    from components.local_run import NotServable, serving_target
    from components.served import export_served

    served_dir = served_onnx.get(winner, tmp_path / "served")
    if winner not in served_onnx:
        export_served(trained_model, winner, served_dir)
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"winner": winner, "model": {"path": str(trained_model)},
                                   "served": {"path": str(served_dir), "backend": winner},
                                   "gate": {"decision": "promote", "reason": "no champion"},
                                   "run": {"artifacts": str(tmp_path / "artifacts" / "run")}}))
    assert serving_target(summary) == (str(served_dir), winner)
    served = GTSRBModel("gtsrb", str(served_dir), winner, max_batch=1)
    answer = served.predict(served.preprocess(v1(image_instance(encode(sign_image(14, random.Random(1)), "PNG")))))
    assert 0 <= answer["predictions"][0]["class_id"] < len(CLASS_NAMES)
    with pytest.raises(NotServable, match="run `make local` first"):
        serving_target(tmp_path / "none.json")


# --------------------------------------------------------------------------- the package's boundary
def _project_imports(path) -> set[str]:
    """Every components.* module ``path`` imports, at module level or inside functions."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {name for name in found if name.split(".")[0] == "components"}


def test_no_serving_module_reaches_evaluate_or_preprocess():
    """Serving reads only the model artifact: no module of components/serving, nor anything they
    import (transitively), imports the evaluate step or the data set's preprocessing."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]

    def source(module: str):
        base = root.joinpath(*module.split("."))
        return next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None)

    pending = [f"components.serving.{p.stem}" for p in (root / "components" / "serving").glob("*.py")]
    assert "components.serving.model" in pending and "components.serving.__main__" in pending
    seen = set()
    while pending:
        module = pending.pop()
        if module in seen or source(module) is None:
            continue
        seen.add(module)
        pending += _project_imports(source(module))
    assert {"components.model", "components.backends"} <= seen
    assert not seen & {"components.evaluate", "components.preprocess"}, sorted(seen)


# --------------------------------------------------------------------------- binary tensors, gRPC
def test_binary_and_grpc_requests_answer_like_json(model):
    """The same images and tensor as JSON, as REST binary tensors (raw image bytes, base64 text) and
    as a gRPC request (raw contents, typed parameters): the same answers."""
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

    from components.serving import binary

    png, ppm = encode(sign_image(4, random.Random(4)), "PNG"), encode(sign_image(7, random.Random(7)), "PPM")
    as_json = InferRequest("gtsrb", [InferInput("image", [2], "BYTES", [b64(png), b64(ppm)])], parameters={"top_k": 3})
    want = model.predict(model.preprocess(as_json)).to_rest()[0]["outputs"]
    for elements in ([png, ppm], [b64(png).encode(), ppm]):
        raw = b"".join(len(e).to_bytes(4, "little") + e for e in elements)
        header = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2],
                                         "parameters": {"binary_data_size": len(raw)}}],
                             "parameters": {"top_k": 3}}).encode()
        request = binary.parse_request(header + raw, str(len(header)), "gtsrb")
        assert model.predict(model.preprocess(request)).to_rest()[0]["outputs"] == want
        tensor = pb.ModelInferRequest.InferInputTensor(name="image", datatype="BYTES", shape=[2])
        grpc_request = pb.ModelInferRequest(model_name="gtsrb", inputs=[tensor], raw_input_contents=[raw],
                                            parameters={"top_k": pb.InferParameter(int64_param=3)})
        response = model.predict(model.preprocess(InferRequest.from_grpc(grpc_request)))
        assert {o.name: o.data for o in response.outputs} == {o["name"]: o["data"] for o in want}

    x = model.preprocess(v1(image_instance(png))).x
    as_json = InferRequest("gtsrb", [InferInput("input", [1, 3, 32, 32], "FP32", x.flatten().tolist())])
    header = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32],
                                     "parameters": {"binary_data_size": 4 * 3072}}]}).encode()
    request = binary.parse_request(header + x.tobytes(), str(len(header)), "gtsrb")
    assert (model.predict(model.preprocess(request)).to_rest()[0]
            == model.predict(model.preprocess(as_json)).to_rest()[0])


def test_grpc_answers_only_the_requested_outputs_in_their_order_as_rest_does(model):
    """KServe's gRPC answer carried every output whatever was requested: a client that asked for
    ``probability`` alone and read raw_output_contents[0] got class_id's INT64 bytes."""
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

    png = encode(sign_image(5, random.Random(5)), "PNG")
    raw = len(png).to_bytes(4, "little") + png
    everything = model.predict(model.preprocess(v2(data=(b64(png),), parameters={"top_k": 2}))).to_rest()[0]
    want = {o["name"]: o["data"] for o in everything["outputs"]}
    for names in (["probability"], ["top_k_class_id", "class_id"]):
        request = pb.ModelInferRequest(
            model_name="gtsrb", raw_input_contents=[raw],
            inputs=[pb.ModelInferRequest.InferInputTensor(name="image", datatype="BYTES", shape=[1])],
            outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name=name) for name in names],
            parameters={"top_k": pb.InferParameter(int64_param=2)})
        response = model.predict(model.preprocess(InferRequest.from_grpc(request))).to_grpc()
        assert [o.name for o in response.outputs] == names
        assert len(response.raw_output_contents) in (0, len(names))
        answered = InferResponse.from_grpc(response)
        assert {o.name: o.as_numpy().ravel().tolist() for o in answered.outputs} == \
            {name: pytest.approx(want[name], abs=1e-6) for name in names}


def test_grpc_parameter_values_kserve_cannot_read_are_refused(model):
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

    tensor = pb.ModelInferRequest.InferInputTensor(
        name="image", datatype="BYTES", shape=[1], contents=pb.InferTensorContents(bytes_contents=[GOOD.encode()]))
    grpc_request = pb.ModelInferRequest(model_name="gtsrb", inputs=[tensor],
                                        parameters={"top_k": pb.InferParameter()})   # a double/uint64 arrives empty
    with pytest.raises(InvalidInput, match="parameters.top_k: a value of a type this server does not read"):
        model.preprocess(InferRequest.from_grpc(grpc_request))


def test_the_mmap_threshold_is_fixed_unless_the_environment_says_otherwise(monkeypatch):
    import ctypes

    calls = []
    monkeypatch.setattr(ctypes, "CDLL", lambda name: types.SimpleNamespace(mallopt=lambda *a: calls.append(a)))
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    server.fixed_mmap_threshold()
    assert os.environ["MALLOC_MMAP_THRESHOLD_"] == "131072" and calls == [(-3, 131072)]
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    server.fixed_mmap_threshold()
    assert os.environ["MALLOC_MMAP_THRESHOLD_"] == "65536" and len(calls) == 1
