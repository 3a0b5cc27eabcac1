"""components.storage against a real S3-protocol server on 127.0.0.1 (moto), including KServe's own
storage-initializer download of the s3:// URI the deploy step hands to the InferenceService."""

import io
import uuid

import pytest
import torch
from urllib3.exceptions import ProtocolError

from components import storage
from components.model import CALIBRATION_FILE, CARD_FILE, WEIGHTS_FILE, load_model_artifact, sha256_file
from tests.s3server import s3_store

BUCKET = "mlpipeline"


@pytest.fixture(scope="module")
def client():
    with s3_store(BUCKET) as store:
        yield store


def fresh_uri() -> str:
    return f"minio://{BUCKET}/v2/artifacts/gtsrb/{uuid.uuid4().hex}/train/model"


def keys(client, prefix: str = "") -> list[str]:
    return sorted(o.object_name for o in client.list_objects(BUCKET, prefix=prefix, recursive=True))


def staging_keys(client) -> list[str]:
    return keys(client, storage.STAGING_PREFIX + "/")


def test_uris():
    assert storage.parse_uri("minio://mlpipeline/v2/artifacts/x/model") == ("mlpipeline", "v2/artifacts/x/model")
    assert storage.parse_uri("s3://b/k/") == ("b", "k")
    assert storage.s3_prefix_uri("minio://mlpipeline/v2/a/model") == "s3://mlpipeline/v2/a/model/"
    for bad in ("/tmp/model", "http://host/b/k", "s3://bucket", "s3://bucket/", "minio:///key"):
        with pytest.raises(ValueError):
            storage.parse_uri(bad)


def test_client_settings_are_required(monkeypatch):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "S3_ENDPOINT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(storage.StorageError, match="AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, S3_ENDPOINT"):
        storage.client_from_env()


def test_upload_then_download_round_trip(client, trained_model, tmp_path):
    uri = fresh_uri()
    result = storage.upload_artifact(client, trained_model, uri)

    bucket, prefix = storage.parse_uri(uri)
    assert result["uri"] == f"s3://{bucket}/{prefix}/"
    files = [CALIBRATION_FILE, WEIGHTS_FILE, CARD_FILE]                                         # card last
    assert [f["key"] for f in result["files"]] == [f"{prefix}/{name}" for name in files]
    assert keys(client, prefix) == sorted(f"{prefix}/{name}" for name in files)
    assert staging_keys(client) == []
    for item in result["files"]:
        local = trained_model / item["key"].rsplit("/", 1)[1]
        stat = client.stat_object(BUCKET, item["key"])
        assert stat.size == local.stat().st_size == item["size"]
        assert stat.metadata["x-amz-meta-sha256"] == sha256_file(local) == item["sha256"]

    paths = storage.download_artifact(client, uri, tmp_path / "copy")
    assert sorted(p.name for p in paths) == sorted(files)
    original, card = load_model_artifact(trained_model)
    copy, copy_card = load_model_artifact(tmp_path / "copy")
    assert copy_card == card == storage.read_card(client, uri)
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(original(x), copy(x))


def test_kserve_storage_initializer_downloads_the_storage_uri(client, trained_model, tmp_path):
    """What the cluster's storage-initializer does with the InferenceService's storageUri."""
    from kserve_storage import Storage

    uri = fresh_uri()
    storage_uri = storage.upload_artifact(client, trained_model, uri)["uri"]
    storage.upload_artifact(client, trained_model, uri + "2")      # a sibling prefix must not leak in
    out = tmp_path / "mnt-models"
    out.mkdir()
    Storage.download_files([storage_uri], [str(out)])
    assert sorted(p.name for p in out.iterdir()) == sorted([CALIBRATION_FILE, CARD_FILE, WEIGHTS_FILE])
    assert sha256_file(out / WEIGHTS_FILE) == sha256_file(trained_model / WEIGHTS_FILE)
    _, card = load_model_artifact(out)
    assert card["weights_sha256"] == sha256_file(trained_model / WEIGHTS_FILE)


def test_weights_that_do_not_match_their_card_are_not_uploaded(client, tampered_model):
    uri = fresh_uri()
    with pytest.raises(storage.StorageError, match="does not match the model card"):
        storage.upload_artifact(client, tampered_model, uri)
    assert keys(client, storage.parse_uri(uri)[1]) == []


def test_bytes_that_differ_from_the_expected_sha256_never_reach_the_final_name(client, trained_model):
    key = f"checks/{uuid.uuid4().hex}/{WEIGHTS_FILE}"
    with pytest.raises(storage.StorageError, match="sha256 of the uploaded bytes"):
        storage.upload_file(client, trained_model / WEIGHTS_FILE, BUCKET, key, sha256="0" * 64)
    assert keys(client, key) == []
    assert staging_keys(client) == []


class DroppingClient:
    """Passes everything to a real client, but the connection drops halfway through the upload
    of the model card (after the weights were uploaded)."""

    def __init__(self, client):
        self._client = client

    def __getattr__(self, name):
        return getattr(self._client, name)

    def put_object(self, bucket, key, data, length, **kwargs):
        if key.endswith(CARD_FILE):
            data.read(length // 2)
            raise ProtocolError("connection dropped mid-upload")
        return self._client.put_object(bucket, key, data, length, **kwargs)


def test_a_failed_upload_leaves_no_object_under_the_final_prefix(client, trained_model):
    uri = fresh_uri()
    with pytest.raises(storage.StorageError, match="connection dropped"):
        storage.upload_artifact(DroppingClient(client), trained_model, uri)
    assert keys(client, storage.parse_uri(uri)[1]) == []      # the weights written first are gone again
    assert staging_keys(client) == []


def test_download_rejects_an_object_whose_bytes_changed(client, trained_model, tmp_path):
    uri = fresh_uri()
    storage.upload_artifact(client, trained_model, uri)
    bucket, prefix = storage.parse_uri(uri)
    stat = client.stat_object(bucket, f"{prefix}/{WEIGHTS_FILE}")
    tampered = b"not the weights"
    client.put_object(bucket, f"{prefix}/{WEIGHTS_FILE}", io.BytesIO(tampered), len(tampered),
                      metadata={"sha256": stat.metadata["x-amz-meta-sha256"]})
    with pytest.raises(storage.StorageError, match="do not match sha256"):
        storage.download_artifact(client, uri, tmp_path / "copy")
    assert not (tmp_path / "copy" / WEIGHTS_FILE).exists()


def test_download_of_an_empty_prefix_fails(client, tmp_path):
    with pytest.raises(storage.StorageError, match="no objects"):
        storage.download_artifact(client, fresh_uri(), tmp_path)


def test_a_changed_calibration_sample_is_not_uploaded(client, trained_model, tmp_path):
    import shutil

    changed = tmp_path / "changed"
    shutil.copytree(trained_model, changed)
    (changed / CALIBRATION_FILE).write_bytes(b"other images")
    uri = fresh_uri()
    with pytest.raises(storage.StorageError, match="calibration.pt: sha256 .* does not match the model card"):
        storage.upload_artifact(client, changed, uri)
    assert keys(client, storage.parse_uri(uri)[1]) == []
