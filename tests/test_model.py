import pytest
import torch
from PIL import Image

from components.model import (
    ARCHITECTURES,
    CALIBRATION_FILE,
    CALIBRATION_IMAGES,
    CALIBRATION_SEED,
    DEFAULT_ARCH,
    NUM_CLASSES,
    ImageStandardize,
    ModelArtifactError,
    build_model,
    calibration_images,
    count_flops,
    load_model_artifact,
    normalize,
    read_card,
    save_calibration_sample,
    save_model_artifact,
    sha256_file,
    to_uint8_32,
)


def test_every_architecture_maps_a_batch_to_class_logits():
    for arch in ARCHITECTURES:
        assert build_model(arch).eval()(torch.randn(5, 3, 32, 32)).shape == (5, NUM_CLASSES), arch


def test_unknown_architecture_names_the_known_ones():
    with pytest.raises(ValueError, match="'lp'"):
        build_model("resnet50")


def macs(*layers):   # (output pixels, inputs per output, outputs) per conv / linear layer
    return sum(p * i * o for p, i, o in layers)


def test_flops_are_the_layer_arithmetic():
    lp = macs((30 * 30, 3 * 9, 32), (13 * 13, 32 * 9, 64), (1, 64 * 36, 128), (1, 128, NUM_CLASSES))
    assert count_flops(build_model("lp")) == 2 * lp == 8_386_048
    signnet = macs((32 * 32, 3 * 9, 32), (16 * 16, 32 * 9, 64), (8 * 8, 64 * 9, 128), (4 * 4, 128 * 9, 128),
                   (1, 128 * 16, 128), (1, 128, NUM_CLASSES))
    assert count_flops(build_model("signnet")) == 2 * signnet == 25_897_728 <= 40e6     # issue 11's serving bound


def test_image_standardize_removes_brightness_and_contrast_but_keeps_colour():
    standardize = ImageStandardize()
    x = torch.randn(4, 3, 32, 32)    # normalized images: per-channel mean 0, std 1
    y = standardize(x)
    assert torch.allclose(y, standardize(2.5 * x - 0.7), rtol=1e-3, atol=1e-4)   # up to eps
    centre = y[:, :, 8:24, 8:24]                  # the statistics are the central 16 x 16's
    assert centre.mean(dim=(1, 2, 3)).abs().max() < 1e-5
    assert torch.allclose(centre.var(dim=(1, 2, 3)), torch.ones(4), atol=1e-2)
    red, blue = torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 32)
    red[:, 0, 8:24, 8:24] = 1.0
    blue[:, 2, 8:24, 8:24] = 1.0
    assert not torch.allclose(standardize(red), standardize(blue))
    flat = standardize(torch.full((1, 3, 32, 32), 0.3))
    assert torch.allclose(flat, torch.zeros_like(flat), atol=1e-5)    # no contrast: no division blow-up


def test_to_uint8_32_resizes_any_crop_and_keeps_its_colour():
    tensor = to_uint8_32(Image.new("RGB", (61, 45), (200, 30, 90)))
    assert tensor.dtype == torch.uint8 and tensor.shape == (3, 32, 32)
    assert tensor[:, 16, 16].tolist() == [200, 30, 90]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_upright_turns_as_pillow_exif_transpose_does(orientation):
    """transforms.upright transposes by the EXIF orientation itself (exif_transpose also rewrites
    the EXIF of the copy, 16.7 s for 65,535 tags): the same pixels for all eight orientations."""
    import numpy as np
    from PIL import ImageOps

    from components.transforms import upright

    image = Image.effect_noise((37, 23), 64).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.info["exif"] = exif.tobytes()
    turned = np.asarray(upright(image))
    assert np.array_equal(turned, np.asarray(ImageOps.exif_transpose(image)))
    assert np.array_equal(turned, np.asarray(image)) is (orientation == 1)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_a_photo_stored_sideways_is_turned_upright_by_its_exif_orientation(orientation):
    """A camera stores the sensor's pixels and an EXIF orientation; every viewer shows the image
    turned. The transform sees what the viewer sees (PNG: lossless, so exactly)."""
    import io

    upright = Image.new("RGB", (48, 40), (200, 30, 90))
    upright.paste((20, 40, 220), (0, 0, 48, 12))                 # a blue band on top
    stored = upright.transpose({3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90,
                                8: Image.Transpose.ROTATE_270}[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    png = io.BytesIO()
    stored.save(png, "PNG", exif=exif)
    photo = Image.open(io.BytesIO(png.getvalue()))
    assert photo.size == stored.size != upright.size or orientation == 3
    assert torch.equal(to_uint8_32(photo), to_uint8_32(upright))
    assert not torch.equal(to_uint8_32(stored), to_uint8_32(upright))


def test_16_bit_greyscale_keeps_its_brightness():
    """16-bit greyscale PNG (mode I;16) and PPM with maxval > 255 (mode I) are scaled to 8 bits as PIL
    reads a 16-bit RGB PPM (v * 255 / 65535, rounded); PIL's convert("RGB") would clip them to white."""
    import io

    import numpy as np

    ramp = (np.arange(40 * 40).reshape(40, 40) * 40).astype(np.uint16)           # 0 .. 63960
    png = io.BytesIO()
    Image.fromarray(ramp).save(png, "PNG")
    p5 = b"P5 40 40 65535\n" + ramp.astype(">u2").tobytes()
    p6 = b"P6 40 40 65535\n" + np.repeat(ramp[..., None], 3, axis=2).astype(">u2").tobytes()
    eight = to_uint8_32(Image.fromarray(np.rint(ramp / 257).astype(np.uint8), "L"))
    decoded = {name: Image.open(io.BytesIO(data)) for name, data in
               (("png", png.getvalue()), ("p5", p5), ("p6 (PIL's own 16-bit RGB path)", p6))}
    assert [image.mode for image in decoded.values()] == ["I;16", "I", "RGB"]
    for name, image in decoded.items():
        assert torch.equal(to_uint8_32(image), eight), name
    assert 100 < float(eight.float().mean()) < 150


def test_image_standardize_ignores_the_background_and_refuses_other_windows():
    standardize = ImageStandardize()
    x = torch.randn(2, 3, 32, 32)
    sky = x.clone()
    sky[:, :, :4] = 5.0                           # a bright band of sky above the sign
    assert torch.equal(standardize(sky)[:, :, 8:24, 8:24], standardize(x)[:, :, 8:24, 8:24])
    whole = {k: v for k, v in build_model("signnet").state_dict().items() if not k.endswith("window")}
    with pytest.raises(RuntimeError, match="features.0.window"):   # weights from whole-image statistics
        build_model("signnet").load_state_dict(whole)
    wide = ImageStandardize(window=24)
    wide.load_state_dict(ImageStandardize().state_dict())         # a saved window wins over the default
    assert torch.equal(wide(x), standardize(x))


def test_normalize_scales_then_standardizes_per_channel():
    images = torch.full((2, 3, 32, 32), 255, dtype=torch.uint8)
    out = normalize(images, [0.5, 0.25, 0.0], [0.5, 0.25, 2.0])
    assert out.dtype == torch.float32
    assert out[0, :, 0, 0].tolist() == [1.0, 3.0, 0.5]


def test_the_predictors_in_place_normalizer_equals_the_two_step_transform():
    """transforms.Normalizer (scale and shift folded, written into the batch row) = to_uint8_32 then
    normalize, for RGB and for the modes that need converting (grey, alpha, palette)."""
    import numpy as np

    from components import transforms

    mean, std = [0.34, 0.31, 0.32], [0.27, 0.25, 0.26]
    normalizer, rng = transforms.Normalizer(mean, std), np.random.default_rng(0)
    for mode, size in (("RGB", (35, 35)), ("RGB", (97, 61)), ("L", (40, 33)), ("RGBA", (29, 31)), ("P", (50, 50))):
        pixels = rng.integers(0, 256, (size[1], size[0], len(mode) if mode != "P" else 1), dtype=np.uint8)
        image = Image.fromarray(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels, mode)
        out = np.full((3, 32, 32), np.nan, dtype=np.float32)
        normalizer.into(out, image)
        expected = transforms.normalize(transforms.to_uint8_32(image)[None], mean, std)[0]
        np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6, err_msg=mode)


def test_artifact_round_trip_and_tampered_weights(tmp_path):
    model = build_model(DEFAULT_ARCH).eval()
    card = save_model_artifact(tmp_path, model, {"architecture": DEFAULT_ARCH})
    loaded, loaded_card = load_model_artifact(tmp_path)
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(loaded(x), model(x))
    assert loaded_card["weights_sha256"] == card["weights_sha256"] and len(card["class_names"]) == NUM_CLASSES
    with open(tmp_path / card["weights_file"], "ab") as f:
        f.write(b"x")
    with pytest.raises(ModelArtifactError, match="sha256"):
        load_model_artifact(tmp_path)


def test_the_calibration_sample_is_a_fixed_seeded_uint8_sample_recorded_with_its_sha256(tmp_path):
    images = torch.randint(0, 256, (700, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    first, again = save_calibration_sample(tmp_path / "a", images), save_calibration_sample(tmp_path / "b", images)
    assert first == again and first["images"] == CALIBRATION_IMAGES == 512 and first["seed"] == CALIBRATION_SEED
    assert first["sha256"] == sha256_file(tmp_path / "a" / CALIBRATION_FILE)
    sample = torch.load(tmp_path / "a" / CALIBRATION_FILE, weights_only=True)
    assert sample.dtype == torch.uint8 and sample.shape == (512, 3, 32, 32)
    rows = {bytes(img.flatten().tolist()): i for i, img in enumerate(images)}
    picked = [rows[bytes(img.flatten().tolist())] for img in sample]
    assert picked == sorted(picked) and picked != list(range(512)), "a seeded sample in index order, not the first"


def test_train_puts_its_calibration_sample_into_the_model_artifact(trained_model):
    card = read_card(trained_model)
    assert card["calibration"]["file"] == CALIBRATION_FILE
    assert card["calibration"]["sha256"] == sha256_file(trained_model / CALIBRATION_FILE)
    x = calibration_images(trained_model, card)
    assert x.dtype == torch.float32 and x.shape == (card["calibration"]["images"], 3, 32, 32)
    raw = torch.load(trained_model / CALIBRATION_FILE, weights_only=True)
    assert torch.equal(x, normalize(raw, card["normalization"]["mean"], card["normalization"]["std"]))


def test_a_missing_or_unreadable_card_is_a_model_artifact_error(tmp_path):
    with pytest.raises(ModelArtifactError, match="model card missing"):
        read_card(tmp_path)
    (tmp_path / "model_card.json").write_text("{not json")
    with pytest.raises(ModelArtifactError, match="not a JSON model card"):
        read_card(tmp_path)
