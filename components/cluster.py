"""Names shared by the cluster manifests (manifests/), the deploy step and the Makefile.

KFP 2.17's standalone install runs pipelines in the `kubeflow` namespace and stores artifacts in
SeaweedFS behind its S3 API (bucket `mlpipeline`), which manifests/gtsrb/minio-service.yaml exposes
under the Service name older KFP releases gave MinIO, `minio-service`; the `minio` Python client talks
to that S3 API. The InferenceService lives beside them and reads its `s3://` storageUri through a
service account whose secret carries the S3 endpoint.
"""

NAMESPACE = "kubeflow"
INFERENCE_SERVICE = "gtsrb"
SERVICE_ACCOUNT = "gtsrb-kserve"          # KServe's storage-initializer reads S3 creds through it
S3_SECRET = "gtsrb-minio-s3"              # keys AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY + annotations
MINIO_ENDPOINT = "minio-service.kubeflow.svc.cluster.local:9000"   # SeaweedFS S3 (alias Service)
MINIO_BUCKET = "mlpipeline"
DEPLOYER_SERVICE_ACCOUNT = "pipeline-runner"  # KFP's task pods; RBAC lets it manage InferenceServices
