"""Names shared by the cluster manifests (manifests/), the deploy step and the Makefile.

KFP's standalone install runs pipelines in the `kubeflow` namespace and stores artifacts in its
MinIO (`minio-service`, bucket `mlpipeline`); the InferenceService lives beside them and reads
its `s3://` storageUri through a service account whose secret carries the MinIO endpoint.
"""

NAMESPACE = "kubeflow"
INFERENCE_SERVICE = "gtsrb"
SERVICE_ACCOUNT = "gtsrb-kserve"          # KServe's storage-initializer reads S3 creds through it
S3_SECRET = "gtsrb-minio-s3"              # keys AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY + annotations
MINIO_ENDPOINT = "minio-service.kubeflow.svc.cluster.local:9000"
MINIO_BUCKET = "mlpipeline"
DEPLOYER_SERVICE_ACCOUNT = "pipeline-runner"  # KFP's task pods; RBAC lets it manage InferenceServices
