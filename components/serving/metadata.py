"""V2 model metadata that names the served weights: ``versions: ["sha256:<weights sha256>"]``.

KServe 0.21's DataPlane leaves ``versions`` out of ``GET /v2/models/{name}``. deploy reads this
field (components.rollout.served_weights) to check that the endpoint serves the artifact it
deployed, not an older pod's model.
"""

from __future__ import annotations

from components.rollout import weights_version


def report_weights_in_metadata() -> None:
    """Wrap DataPlane.model_metadata (once per process) to add the model's weights sha256."""
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

    model_metadata.reports_weights = True
    DataPlane.model_metadata = model_metadata
