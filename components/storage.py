"""Model artifacts in MinIO (any S3 server), through the ``minio`` client.

Upload: every file goes to a staging key outside the artifact's prefix, is checked there (the
server's ETag against the MD5 of the bytes sent, the SHA-256 of the bytes sent against the file's
expected SHA-256, the weights' against the model card), and only then is copied server-side to
its final name (a copy is atomic) with its SHA-256 as metadata. So a failed or corrupt upload
never leaves an object under the final name; the model card is written last, so a prefix whose
card is present holds the whole artifact. Download verifies the SHA-256 metadata of each object.

URIs: ``s3://bucket/key`` (KServe's storageUri) and ``minio://bucket/key`` (KFP's artifact URIs
on a cluster) name the same object.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

from minio import Minio
from minio.commonconfig import CopySource
from minio.error import MinioException
from urllib3.exceptions import HTTPError

from components.model import CARD_FILE, ModelArtifactError, artifact_files, sha256_file, verified_card

STAGING_PREFIX = ".staging"          # never under an artifact prefix: KServe downloads whole prefixes
SHA256_METADATA = "sha256"           # stored as x-amz-meta-sha256
SINGLE_PUT_LIMIT = 5 << 30           # S3's largest single PUT; larger files would need multipart
SCHEMES = ("s3://", "minio://")
TRANSPORT_ERRORS = (MinioException, HTTPError)


class StorageError(RuntimeError):
    pass


# --------------------------------------------------------------------------- URIs
def parse_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` or ``minio://bucket/key`` -> (bucket, key without surrounding slashes)."""
    scheme = next((s for s in SCHEMES if uri.startswith(s)), None)
    if scheme is None:
        raise ValueError(f"{uri!r} is not an object-store URI ({' or '.join(SCHEMES)}bucket/key)")
    bucket, _, key = uri[len(scheme):].partition("/")
    if not bucket or not key.strip("/"):
        raise ValueError(f"{uri!r} needs a bucket and a key")
    return bucket, key.strip("/")


def s3_prefix_uri(uri: str) -> str:
    """The ``s3://bucket/prefix/`` KServe's storage-initializer downloads: every object below it.
    The trailing slash keeps a sibling prefix (``.../model2``) out of ``.../model``."""
    bucket, key = parse_uri(uri)
    return f"s3://{bucket}/{key}/"


# --------------------------------------------------------------------------- client
def client_from_env(endpoint: str | None = None) -> Minio:
    """A client from the variables KServe's S3 secret also gives the storage-initializer:
    AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, S3_ENDPOINT (host:port; or ``endpoint``),
    S3_USE_HTTPS ("0"/"1", default "0"), AWS_DEFAULT_REGION (default us-east-1)."""
    missing = [k for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if not os.environ.get(k)]
    endpoint = endpoint or os.environ.get("S3_ENDPOINT")
    if not endpoint:
        missing.append("S3_ENDPOINT")
    if missing:
        raise StorageError(f"object store settings missing: {', '.join(missing)}")
    use_https = os.environ.get("S3_USE_HTTPS", "0")
    if use_https not in ("0", "1"):
        raise StorageError(f"S3_USE_HTTPS must be 0 or 1, got {use_https!r}")
    return Minio(endpoint.removeprefix("http://").removeprefix("https://"),
                 access_key=os.environ["AWS_ACCESS_KEY_ID"], secret_key=os.environ["AWS_SECRET_ACCESS_KEY"],
                 secure=use_https == "1", region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))


# --------------------------------------------------------------------------- upload
class _HashingReader:
    """File reader that hashes exactly the bytes handed to the client."""

    def __init__(self, f):
        self._f, self.md5, self.sha256 = f, hashlib.md5(), hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size)
        self.md5.update(data)
        self.sha256.update(data)
        return data


def upload_file(client: Minio, path: str | Path, bucket: str, key: str, sha256: str | None = None) -> dict:
    """Upload one file to ``bucket/key`` via a checked staging object; returns {key, size, sha256, etag}.

    ``sha256`` is the digest the file must have (default: its digest when the upload starts).
    """
    path = Path(path)
    size = path.stat().st_size
    if size > SINGLE_PUT_LIMIT:
        raise StorageError(f"{path}: {size} bytes is more than one S3 PUT takes ({SINGLE_PUT_LIMIT})")
    expected = sha256 or sha256_file(path)
    staging = f"{STAGING_PREFIX}/{uuid.uuid4().hex}/{path.name}"
    try:
        with open(path, "rb") as f:
            reader = _HashingReader(f)
            written = client.put_object(bucket, staging, reader, size, metadata={SHA256_METADATA: expected},
                                        part_size=max(size, 5 << 20))
        sent_sha256 = reader.sha256.hexdigest()
        if sent_sha256 != expected:
            raise StorageError(f"{path}: sha256 of the uploaded bytes {sent_sha256} is not the expected {expected}")
        if written.etag.strip('"') != reader.md5.hexdigest():
            raise StorageError(f"{path}: the server stored {written.etag} but the MD5 of the bytes sent is "
                               f"{reader.md5.hexdigest()}")
        final = client.copy_object(bucket, key, CopySource(bucket, staging))
        if final.etag.strip('"') != reader.md5.hexdigest():
            raise StorageError(f"s3://{bucket}/{key}: copy has ETag {final.etag}, expected {reader.md5.hexdigest()}")
    except TRANSPORT_ERRORS as e:
        raise StorageError(f"{path} -> s3://{bucket}/{key}: {e}") from e
    finally:
        _remove_quietly(client, bucket, staging)
    return {"key": key, "size": size, "sha256": expected, "etag": reader.md5.hexdigest()}


def _remove_quietly(client: Minio, bucket: str, key: str) -> None:
    """Clean-up after success or failure; a failure to clean up must not hide the original error."""
    try:
        client.remove_object(bucket, key)
    except (*TRANSPORT_ERRORS, OSError):
        pass


def upload_artifact(client: Minio, directory: str | Path, uri: str) -> dict:
    """Upload a model artifact directory (weights + model card) below ``uri``.

    Every file the card names must match its sha256 (nothing is uploaded otherwise); the card goes
    last; on any failure the objects this call wrote are removed again. Returns
    {uri (s3://.../), files: [{key, size, sha256, etag}, ...]}.
    """
    directory = Path(directory)
    bucket, prefix = parse_uri(uri)
    try:
        expected = artifact_files(verified_card(directory))
    except ModelArtifactError as e:
        raise StorageError(f"{e}; refusing to upload") from None
    card_path = directory / CARD_FILE
    files = sorted((p for p in directory.iterdir() if p.is_file() and p.name != CARD_FILE), key=lambda p: p.name)
    uploaded = []
    try:
        for path in [*files, card_path]:
            uploaded.append(upload_file(client, path, bucket, f"{prefix}/{path.name}", expected.get(path.name)))
    except BaseException:
        for item in uploaded:
            _remove_quietly(client, bucket, item["key"])
        raise
    return {"uri": s3_prefix_uri(uri), "files": uploaded}


# --------------------------------------------------------------------------- download
def list_artifact(client: Minio, uri: str) -> list:
    bucket, prefix = parse_uri(uri)
    try:
        return [o for o in client.list_objects(bucket, prefix=f"{prefix}/", recursive=True) if not o.is_dir]
    except TRANSPORT_ERRORS as e:
        raise StorageError(f"{uri}: cannot list objects: {e}") from e


def download_artifact(client: Minio, uri: str, directory: str | Path) -> list[Path]:
    """Download every object below ``uri`` into ``directory``, verifying sha256 metadata where present."""
    bucket, prefix = parse_uri(uri)
    directory = Path(directory)
    objects = list_artifact(client, uri)
    if not objects:
        raise StorageError(f"{uri}: no objects")
    paths = []
    for obj in objects:
        target = directory / obj.object_name[len(prefix) + 1:]
        try:
            stat = client.fget_object(bucket, obj.object_name, str(target))   # returns the object's stat
        except TRANSPORT_ERRORS as e:
            raise StorageError(f"s3://{bucket}/{obj.object_name}: {e}") from e
        expected = (stat.metadata or {}).get(f"x-amz-meta-{SHA256_METADATA}")
        if expected and sha256_file(target) != expected:
            target.unlink()
            raise StorageError(f"s3://{bucket}/{obj.object_name}: downloaded bytes do not match sha256 {expected}")
        paths.append(target)
    return paths


def read_card(client: Minio, uri: str) -> dict:
    """The model card stored below ``uri`` (to check what a storageUri holds before deploying it)."""
    bucket, prefix = parse_uri(uri)
    try:
        response = client.get_object(bucket, f"{prefix}/{CARD_FILE}")
        try:
            return json.loads(response.read())
        finally:
            response.close()
            response.release_conn()
    except TRANSPORT_ERRORS as e:
        raise StorageError(f"{uri}: cannot read {CARD_FILE}: {e}") from e
