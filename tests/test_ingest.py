import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from components.ingest import ARCHIVE, MANIFEST, IngestError, ingest_dataset
from components.model import NUM_CLASSES
from components.preprocess import load_split, preprocess_dataset
from tests.synthetic import make_gtsrb


@pytest.fixture()
def gtsrb_copy(synthetic_root, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(synthetic_root, root)
    return root


def test_ingest_packs_every_image_with_labels_and_tracks(synthetic_root, tmp_path):
    summary = ingest_dataset(str(synthetic_root), str(tmp_path / "raw"))
    assert summary == {"train_images": NUM_CLASSES * 6, "test_images": NUM_CLASSES * 2,
                       "train_tracks": NUM_CLASSES * 2}
    manifest = json.loads((tmp_path / "raw" / MANIFEST).read_text())
    first = manifest["train"][0]
    assert first == {"file": "gtsrb/GTSRB/Training/00000/00000_00000.ppm", "label": 0, "track": 0}
    assert manifest["train"][-1]["label"] == 42 and manifest["train"][-1]["track"] == 1
    with tarfile.open(tmp_path / "raw" / ARCHIVE) as tar:
        names = set(tar.getnames())
    assert {e["file"] for e in manifest["train"] + manifest["test"]} <= names
    assert "gtsrb/GT-final_test.csv" in names


def test_truncated_image_fails_with_its_name_and_leaves_no_output(gtsrb_copy, tmp_path):
    bad = gtsrb_copy / "gtsrb/GTSRB/Training/00007/00001_00002.ppm"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    out = tmp_path / "raw"
    with pytest.raises(IngestError, match="00007/00001_00002.ppm"):
        ingest_dataset(str(gtsrb_copy), str(out))
    assert not out.exists() and not list(tmp_path.glob("raw*"))


@pytest.mark.parametrize("damage, message", [
    (lambda r: (r / "gtsrb/GTSRB/Final_Test/Images/00003.ppm").write_bytes(b"not an image"), "00003.ppm: unreadable"),
    (lambda r: (r / "gtsrb/GTSRB/Final_Test/Images/00004.ppm").write_bytes(b""), "00004.ppm: empty file"),
    (lambda r: shutil.rmtree(r / "gtsrb/GTSRB/Final_Test"), "00000.ppm: listed in .*GT-final_test.csv:2 but missing"),
    (lambda r: (r / "gtsrb/GT-final_test.csv").unlink(), "test split missing"),
    (lambda r: shutil.rmtree(r / "gtsrb/GTSRB/Training"), "does not hold GTSRB: expected .*/gtsrb/GTSRB/Training/"),
    (lambda r: (r / "gtsrb/GTSRB/Training/00042").rename(r / "gtsrb/GTSRB/Training/00043"),
     "00043: label 43 is outside 0..42"),
    (lambda r: shutil.rmtree(r / "gtsrb/GTSRB/Training/00005"), r"no images for class\(es\) \[5\]"),
    (lambda r: (r / "gtsrb/GT-final_test.csv").write_text("Filename;ClassId\n00000.ppm;57\n"),
     "GT-final_test.csv:2: label 57 is outside 0..42"),
    (lambda r: (r / "gtsrb/GT-final_test.csv").write_text("Filename;ClassId\n00000.ppm;stop\n"),
     "label 'stop' is not an integer"),
])
def test_bad_input_is_named(gtsrb_copy, tmp_path, damage, message):
    damage(gtsrb_copy)
    with pytest.raises(IngestError, match=message):
        ingest_dataset(str(gtsrb_copy), str(tmp_path / "raw"))
    assert not (tmp_path / "raw").exists()


def test_missing_dataset_without_download_names_what_was_expected(tmp_path):
    with pytest.raises(IngestError, match=f"data folder {tmp_path / 'nowhere'} does not exist; expected "
                                          f"{tmp_path / 'nowhere'}/gtsrb/GTSRB/Training/"):
        ingest_dataset(str(tmp_path / "nowhere"), str(tmp_path / "raw"))
    assert sorted(tmp_path.iterdir()) == []


def test_a_folder_one_level_too_deep_is_named_and_left_untouched(synthetic_root, tmp_path):
    """DATA_DIR=.../gtsrb (one level too deep): what was expected, what is there, the folder to use;
    nothing is created in it and nothing is downloaded."""
    deep = synthetic_root / "gtsrb"
    before = sorted(deep.rglob("*"))
    with pytest.raises(IngestError) as err:
        ingest_dataset(str(deep), str(tmp_path / "raw"))
    assert str(err.value) == (f"data folder {deep} does not hold GTSRB: expected {deep}/gtsrb/GTSRB/Training/ and "
                              f"{deep}/gtsrb/GT-final_test.csv (torchvision's GTSRB layout); found GT-final_test.csv, "
                              f"GTSRB/; that is 1 level too deep: use {synthetic_root}")
    assert sorted(deep.rglob("*")) == before and not (tmp_path / "raw").exists()


def test_a_folder_above_gtsrb_and_an_unrelated_one_are_named(synthetic_root, tmp_path):
    from components.ingest import layout_problem

    above = tmp_path / "above"
    above.mkdir()
    (above / "copy").symlink_to(synthetic_root)
    assert layout_problem(above).endswith(f"found copy/; GTSRB is one level down: use {above / 'copy'}")
    for name in "abcdefghij":
        (tmp_path / "photos" / name).mkdir(parents=True)
    assert layout_problem(tmp_path / "photos").endswith("found a/, b/, c/, d/, e/, f/, g/, h/ (+2 more)")
    (tmp_path / "empty").mkdir()
    assert layout_problem(tmp_path / "empty").endswith("found nothing (empty folder)")
    assert layout_problem(synthetic_root) is None


def test_failed_download_explains_the_local_copy_option(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "GTSRB", offline)
    with pytest.raises(IngestError, match="make local DATA_DIR=") as err:
        ingest_dataset(str(tmp_path / "data"), str(tmp_path / "raw"), allow_download=True)
    assert "name resolution" in str(err.value)


def test_preprocess_stores_uint8_tensors_and_counts(prepared):
    train, test = load_split(prepared, "train"), load_split(prepared, "test")
    assert train["images"].shape == (NUM_CLASSES * 6, 3, 32, 32) and train["images"].dtype == torch.uint8
    assert test["images"].shape == (NUM_CLASSES * 2, 3, 32, 32)
    assert train["class_counts"].tolist() == [6] * NUM_CLASSES
    assert test["class_counts"].tolist() == [2] * NUM_CLASSES
    assert train["labels"][:6].tolist() == [0] * 6
    assert train["tracks"].unique().numel() == NUM_CLASSES * 2   # tracks are global ids
    assert train["images"].float().std() > 10                      # real pixels, not zeros


def test_preprocess_of_a_damaged_raw_dataset_leaves_no_output(prepared, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(prepared.parent / "raw", raw)
    with tarfile.open(raw / ARCHIVE, "w") as tar:        # an archive missing every image
        tar.add(raw / MANIFEST, arcname=MANIFEST)
    out = tmp_path / "data"
    with pytest.raises(KeyError):
        preprocess_dataset(str(raw), str(out))
    assert not list(tmp_path.glob("data*"))
    (raw / ARCHIVE).unlink()                              # no archive at all
    with pytest.raises(FileNotFoundError):
        preprocess_dataset(str(raw), str(out))
    assert not list(tmp_path.glob("data*"))


def test_preprocess_matches_the_serving_transform(synthetic_root, prepared):
    from PIL import Image

    from components.model import to_uint8_32

    with Image.open(synthetic_root / "gtsrb/GTSRB/Training/00000/00000_00000.ppm") as image:
        expected = to_uint8_32(image)
    assert torch.equal(load_split(prepared, "train")["images"][0], expected)


def test_real_sample_ingests(sample_data):
    manifest = json.loads((sample_data.parent / "raw" / MANIFEST).read_text())
    assert len(manifest["train"]) == 1752 and len(manifest["test"]) == 817
    assert load_split(sample_data, "test")["class_counts"].sum() == 817


def test_synthetic_generator_is_deterministic(tmp_path):
    a, b = make_gtsrb(tmp_path / "a", seed=3), make_gtsrb(tmp_path / "b", seed=3)
    name = "gtsrb/GTSRB/Training/00011/00001_00002.ppm"
    assert (a / name).read_bytes() == (b / name).read_bytes()


def fake_gtsrb_download(source, fail_on=None):
    """torchvision's GTSRB class with a download that copies ``source`` (torchvision's layout)
    split by split, and raises while writing the split ``fail_on``."""
    import torchvision.datasets

    real = torchvision.datasets.GTSRB

    def gtsrb(root, split, download=False, **kwargs):
        if download:
            base = Path(root) / "gtsrb"
            if split == "train":
                shutil.copytree(source / "gtsrb" / "GTSRB" / "Training", base / "GTSRB" / "Training")
            else:
                shutil.copytree(source / "gtsrb" / "GTSRB" / "Final_Test", base / "GTSRB" / "Final_Test")
                shutil.copy(source / "gtsrb" / "GT-final_test.csv", base / "GT-final_test.csv")
            if split == fail_on:
                (base / "GTSRB_Final_Test_Images.zip").write_bytes(b"half a zip")
                raise OSError("Connection reset by peer")
        return real(root=root, split=split, **kwargs)
    return gtsrb


@pytest.mark.parametrize("made_root", [True, False])
def test_a_failed_download_leaves_nothing_behind(synthetic_root, tmp_path, monkeypatch, made_root):
    """The train split arrived, the test split broke off half-way: no gtsrb/ with a partial copy,
    no temporary folder, and none of the folders the download made."""
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "GTSRB", fake_gtsrb_download(synthetic_root, fail_on="test"))
    data = tmp_path / "new" / "data"
    if not made_root:
        (data / "notes").mkdir(parents=True)
    with pytest.raises(IngestError, match="Connection reset by peer"):
        ingest_dataset(str(data), str(tmp_path / "raw"), allow_download=True)
    assert not (tmp_path / "raw").exists()
    if made_root:
        assert not (tmp_path / "new").exists()
    else:
        assert sorted(p.name for p in data.iterdir()) == ["notes"]


def test_a_download_lands_whole_and_is_ingested(synthetic_root, tmp_path, monkeypatch):
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "GTSRB", fake_gtsrb_download(synthetic_root))
    data = tmp_path / "data"
    (data / "gtsrb").mkdir(parents=True)        # empty: what a failed download used to leave
    summary = ingest_dataset(str(data), str(tmp_path / "raw"), allow_download=True)
    assert summary == {"train_images": NUM_CLASSES * 6, "test_images": NUM_CLASSES * 2,
                       "train_tracks": NUM_CLASSES * 2}
    assert sorted(p.name for p in data.iterdir()) == ["gtsrb"]


def test_no_download_over_a_partial_copy(synthetic_root, tmp_path, monkeypatch):
    import torchvision.datasets

    def no_download(*args, **kwargs):
        raise AssertionError("downloaded over a partial copy")

    monkeypatch.setattr(torchvision.datasets, "GTSRB", no_download)
    partial = tmp_path / "data" / "gtsrb"
    partial.mkdir(parents=True)
    (partial / "GT-final_test.csv").write_text("Filename;ClassId\n")
    with pytest.raises(IngestError, match=r"gtsrb exists but holds no GTSRB/Training/: not downloading over it"):
        ingest_dataset(str(tmp_path / "data"), str(tmp_path / "raw"), allow_download=True)
    assert (partial / "GT-final_test.csv").exists()
