"""A gRPC server on 127.0.0.1 answering the four ML Metadata calls components/mlmd.py makes, from
recorded MLMD objects (tests/fixtures/kfp-2.17-second-run.json); always stopped."""

from __future__ import annotations

import json
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path

from google.protobuf import json_format

from components import mlmd

RECORDED = Path(__file__).parent / "fixtures" / "kfp-2.17-second-run.json"
PAGE = 4            # smaller than the run's executions, so that the client must follow next_page_token


def recorded() -> dict:
    return json.loads(RECORDED.read_text())


def _message(name: str, value: dict):
    return json_format.ParseDict(value, mlmd.MESSAGES[name]())


class Store:
    """MLMD's answers over ``objects`` ({"context", "executions", "events", "artifacts"}, JSON form)."""

    def __init__(self, objects: dict):
        self.objects = objects
        self.calls: list[str] = []

    def GetContextByTypeAndName(self, request, context):
        found = self.objects["context"]
        hit = request.type_name == mlmd.RUN_CONTEXT_TYPE and request.context_name == found["name"]
        return mlmd.MESSAGES["GetContextByTypeAndNameResponse"](context=_message("Context", found) if hit else None)

    def GetExecutionsByContext(self, request, context):
        start = int(request.options.next_page_token or 0)
        size = min(request.options.max_result_size or 20, PAGE)
        rows = self.objects["executions"][start:start + size] if request.context_id == int(
            self.objects["context"]["id"]) else []
        more = start + size < len(self.objects["executions"]) and rows
        return mlmd.MESSAGES["GetExecutionsByContextResponse"](
            executions=[_message("Execution", e) for e in rows], next_page_token=str(start + size) if more else "")

    def GetEventsByExecutionIDs(self, request, context):
        wanted = {str(i) for i in request.execution_ids}
        return mlmd.MESSAGES["GetEventsByExecutionIDsResponse"](
            events=[_message("Event", e) for e in self.objects["events"] if e["executionId"] in wanted])

    def GetArtifactsByID(self, request, context):
        wanted = {str(i) for i in request.artifact_ids}
        return mlmd.MESSAGES["GetArtifactsByIDResponse"](
            artifacts=[_message("Artifact", a) for a in self.objects["artifacts"] if a["id"] in wanted])


@contextmanager
def mlmd_server(objects: dict):
    """Yields (``host:port``, Store) of a gRPC MetadataStoreService stand-in on a free port."""
    import grpc

    store = Store(objects)

    def handler(rpc):
        request, _ = mlmd.METHODS[rpc]

        def call(message, context):
            store.calls.append(rpc)
            return getattr(store, rpc)(message, context)

        return grpc.unary_unary_rpc_method_handler(call, request_deserializer=mlmd.MESSAGES[request].FromString,
                                                   response_serializer=lambda m: m.SerializeToString())

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        mlmd.SERVICE, {rpc: handler(rpc) for rpc in mlmd.METHODS})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", store
    finally:
        server.stop(grace=None).wait(10)
