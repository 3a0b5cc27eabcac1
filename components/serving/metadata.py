"""V2 metadata that tells the truth about this server, set once per process on KServe's DataPlane
(REST and gRPC both read it):

- model metadata names the served weights: ``versions: ["sha256:<weights sha256>"]``. KServe 0.21
  leaves ``versions`` out of ``GET /v2/models/{name}``; deploy reads this field
  (components.rollout.served_weights) to check that the endpoint serves the artifact it deployed,
  not an older pod's model.
- server metadata (``GET /v2``, gRPC ``ServerMetadata``) lists the protocol extensions this server
  offers. KServe always lists ``model_repository_extension``, whose routes this server does not
  offer (components/serving/surface.py); it does offer the binary tensor extension
  (components/serving/binary.py).
"""

from __future__ import annotations

from components.rollout import weights_version

EXTENSIONS = ["binary_tensor_data"]


def correct_metadata() -> None:
    """Wrap DataPlane.model_metadata and DataPlane.metadata (once per process)."""
    from kserve.protocol.dataplane import DataPlane

    original = DataPlane.model_metadata
    if getattr(original, "reports_weights", False):
        return

    async def model_metadata(self, model_name: str) -> dict:
        metadata = await original(self, model_name)
        sha = getattr(self.get_model_from_registry(model_name), "weights_sha256", None)
        if sha:
            metadata["versions"] = [weights_version(sha)]
        return metadata

    server_metadata = DataPlane.metadata

    def metadata(self) -> dict:
        return server_metadata(self) | {"extensions": list(EXTENSIONS)}

    model_metadata.reports_weights = True
    DataPlane.model_metadata = model_metadata
    DataPlane.metadata = metadata
