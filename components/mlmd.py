"""A KFP run's output artifacts, found where KFP records them: ML Metadata (MLMD).

KFP 2.17's run API cannot say where a task's outputs are: it fills ``run_details.task_details``
from the Argo workflow's nodes without artifacts or MLMD execution ids (backend
src/apiserver/server/api_converter.go, ``toModelTask``: "TODO: parse input and output
artifacts"), and its v2beta1 API has no artifact endpoint. KFP's driver and launcher record
every task in MLMD instead: an execution in the run's context (type ``system.PipelineRun``,
named by the run id) with the custom property ``task_name``, and one OUTPUT event per output
artifact whose path is the output's name. A task served from KFP's cache gets an execution in
the new run too (state CACHED), whose OUTPUT events point at the artifacts of the run that
computed them (backend src/v2/driver/cache.go, ``reuseCachedOutputs``): their URIs are under
*that* run's id, never under the new one.

- :func:`output_uri` (pure): the URI of one task output, from the run's executions, their events
  and the artifacts, as MLMD's JSON form (``MessageToDict``) has them.
- :class:`MetadataStore`: the four MLMD calls that feed it, over gRPC (``metadata-grpc-service``,
  port 8080; `make pipeline` port-forwards it). The messages are the fields read here of
  ml_metadata 1.14.0's metadata_store.proto / metadata_store_service.proto (the server KFP 2.17
  deploys), built with the protobuf runtime; protobuf skips the fields left out.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory

RUN_CONTEXT_TYPE = "system.PipelineRun"
DONE_STATES = ("COMPLETE", "CACHED")
PAGE_SIZE = 100
SERVICE = "ml_metadata.MetadataStoreService"
DEADLINE_SECONDS = 30


class OutputNotFound(LookupError):
    pass


# --------------------------------------------------------------------------- pure
def _custom_string(execution: dict, name: str) -> str | None:
    return execution.get("customProperties", {}).get(name, {}).get("stringValue")


def output_uri(executions: list[dict], events: list[dict], artifacts: list[dict], task: str, output: str) -> str:
    """The URI of ``task``'s output ``output`` in one run (MLMD JSON objects of that run's context).

    The task's execution must be COMPLETE or CACHED; if KFP retried it, the last such one counts."""
    mine = [e for e in executions if _custom_string(e, "task_name") == task]
    done = [e for e in mine if e.get("lastKnownState") in DONE_STATES]
    if not done:
        seen = ", ".join(f"{e.get('id')}={e.get('lastKnownState')}" for e in mine) or "none"
        tasks = sorted({t for e in executions if (t := _custom_string(e, "task_name"))})
        raise OutputNotFound(f"no finished execution of task {task!r} in this run (its executions: {seen}; "
                             f"tasks recorded: {', '.join(tasks) or 'none'})")
    execution = max(done, key=lambda e: int(e["id"]))
    ids = [ev["artifactId"] for ev in events
           if ev.get("executionId") == execution["id"] and ev.get("type") == "OUTPUT"
           and [s.get("key") for s in ev.get("path", {}).get("steps", [])] == [output]]
    if len(ids) != 1:
        raise OutputNotFound(f"execution {execution['id']} of task {task!r} has {len(ids)} OUTPUT events "
                             f"for {output!r}, expected 1")
    uri = next((a.get("uri") for a in artifacts if a.get("id") == ids[0]), None)
    if not uri:
        raise OutputNotFound(f"artifact {ids[0]} ({task}.{output}) has no URI in MLMD")
    return uri


# --------------------------------------------------------------------------- messages
_F = descriptor_pb2.FieldDescriptorProto
_SCALARS = {"int64": _F.TYPE_INT64, "int32": _F.TYPE_INT32, "string": _F.TYPE_STRING, "double": _F.TYPE_DOUBLE}
# message -> (field, number, type, repeated); a type that is not a scalar is a message or enum of this file.
_MESSAGES = {
    "Value": [("int_value", 1, "int64", False), ("double_value", 2, "double", False),
              ("string_value", 3, "string", False)],
    "Artifact": [("id", 1, "int64", False), ("type_id", 2, "int64", False), ("uri", 3, "string", False),
                 ("custom_properties", 5, "map", True)],
    "Execution": [("id", 1, "int64", False), ("type_id", 2, "int64", False),
                  ("last_known_state", 3, "Execution.State", False), ("custom_properties", 5, "map", True)],
    "Context": [("id", 1, "int64", False), ("type_id", 2, "int64", False), ("name", 3, "string", False)],
    "Event": [("artifact_id", 1, "int64", False), ("execution_id", 2, "int64", False),
              ("path", 3, "Event.Path", False), ("type", 4, "Event.Type", False)],
    "Event.Path": [("steps", 1, "Event.Path.Step", True)],
    "Event.Path.Step": [("index", 1, "int64", False), ("key", 2, "string", False)],
    "ListOperationOptions": [("max_result_size", 1, "int32", False), ("next_page_token", 3, "string", False)],
    "GetContextByTypeAndNameRequest": [("type_name", 1, "string", False), ("context_name", 2, "string", False)],
    "GetContextByTypeAndNameResponse": [("context", 1, "Context", False)],
    "GetExecutionsByContextRequest": [("context_id", 1, "int64", False), ("options", 2, "ListOperationOptions", False)],
    "GetExecutionsByContextResponse": [("executions", 1, "Execution", True), ("next_page_token", 2, "string", False)],
    "GetEventsByExecutionIDsRequest": [("execution_ids", 1, "int64", True)],
    "GetEventsByExecutionIDsResponse": [("events", 1, "Event", True)],
    "GetArtifactsByIDRequest": [("artifact_ids", 1, "int64", True)],
    "GetArtifactsByIDResponse": [("artifacts", 1, "Artifact", True)],
}
_ENUMS = {
    "Execution.State": ["UNKNOWN", "NEW", "RUNNING", "COMPLETE", "FAILED", "CACHED", "CANCELED"],
    "Event.Type": ["UNKNOWN", "DECLARED_OUTPUT", "DECLARED_INPUT", "INPUT", "OUTPUT", "INTERNAL_INPUT",
                   "INTERNAL_OUTPUT", "PENDING_OUTPUT"],
}


def _build() -> dict[str, type]:
    file = descriptor_pb2.FileDescriptorProto(name="gtsrb/mlmd_subset.proto", package="ml_metadata",
                                              syntax="proto2")
    protos = {}
    for name in _MESSAGES:                           # parents are listed before their nested messages
        parent, _, short = name.rpartition(".")
        protos[name] = (protos[parent].nested_type if parent else file.message_type).add(name=short)
    for name, values in _ENUMS.items():
        parent, _, short = name.rpartition(".")
        enum = protos[parent].enum_type.add(name=short)
        for number, value in enumerate(values):
            enum.value.add(name=value, number=number)
    for name, fields in _MESSAGES.items():
        for field, number, kind, repeated in fields:
            proto = protos[name].field.add(name=field, number=number,
                                           label=_F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL)
            if kind in _SCALARS:
                proto.type = _SCALARS[kind]
            elif kind == "map":                      # map<string, Value>: a repeated entry message
                entry = protos[name].nested_type.add(name="CustomPropertiesEntry")
                entry.options.map_entry = True
                entry.field.add(name="key", number=1, type=_F.TYPE_STRING, label=_F.LABEL_OPTIONAL)
                entry.field.add(name="value", number=2, type=_F.TYPE_MESSAGE, label=_F.LABEL_OPTIONAL,
                                type_name=".ml_metadata.Value")
                proto.type, proto.type_name = _F.TYPE_MESSAGE, f".ml_metadata.{name}.CustomPropertiesEntry"
            else:
                proto.type = _F.TYPE_ENUM if kind in _ENUMS else _F.TYPE_MESSAGE
                proto.type_name = f".ml_metadata.{kind}"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"ml_metadata.{name}"))
            for name in _MESSAGES}


MESSAGES = _build()
METHODS = {  # rpc -> (request, response)
    "GetContextByTypeAndName": ("GetContextByTypeAndNameRequest", "GetContextByTypeAndNameResponse"),
    "GetExecutionsByContext": ("GetExecutionsByContextRequest", "GetExecutionsByContextResponse"),
    "GetEventsByExecutionIDs": ("GetEventsByExecutionIDsRequest", "GetEventsByExecutionIDsResponse"),
    "GetArtifactsByID": ("GetArtifactsByIDRequest", "GetArtifactsByIDResponse"),
}


def as_json(message) -> dict:
    return json_format.MessageToDict(message)


# --------------------------------------------------------------------------- gRPC
class MetadataStore:
    """MLMD's gRPC API at ``endpoint`` (host:port); ``close()`` (or ``with``) ends the channel."""

    def __init__(self, endpoint: str):
        import grpc

        self.endpoint = endpoint
        self._grpc = grpc
        self._channel = grpc.insecure_channel(endpoint)
        self._calls = {rpc: self._channel.unary_unary(f"/{SERVICE}/{rpc}",
                                                      request_serializer=MESSAGES[req].SerializeToString,
                                                      response_deserializer=MESSAGES[resp].FromString)
                       for rpc, (req, resp) in METHODS.items()}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, rpc: str, **fields):
        request = MESSAGES[METHODS[rpc][0]](**fields)
        try:
            return self._calls[rpc](request, timeout=DEADLINE_SECONDS, wait_for_ready=True)
        except self._grpc.RpcError as e:
            raise OutputNotFound(f"MLMD at {self.endpoint}: {rpc} failed: {e.code().name} {e.details()}") from e

    def run_objects(self, run_id: str) -> tuple[list[dict], list[dict], list[dict]]:
        """(executions, their events, the artifacts of those events) of one KFP run, as MLMD JSON."""
        answer = self._call("GetContextByTypeAndName", type_name=RUN_CONTEXT_TYPE, context_name=run_id)
        if not answer.HasField("context"):
            raise OutputNotFound(f"MLMD at {self.endpoint} has no {RUN_CONTEXT_TYPE} context for run {run_id}")
        executions, token = [], ""
        while True:
            options = MESSAGES["ListOperationOptions"](max_result_size=PAGE_SIZE, next_page_token=token)
            page = self._call("GetExecutionsByContext", context_id=answer.context.id, options=options)
            executions += page.executions
            token = page.next_page_token
            if not token:
                break
        events = self._call("GetEventsByExecutionIDs", execution_ids=[e.id for e in executions]).events
        ids = sorted({e.artifact_id for e in events if e.HasField("artifact_id")})
        artifacts = self._call("GetArtifactsByID", artifact_ids=ids).artifacts if ids else []
        return [as_json(e) for e in executions], [as_json(e) for e in events], [as_json(a) for a in artifacts]


def run_output_uri(endpoint: str, run_id: str, task: str, output: str) -> str:
    """Where ``task``'s output ``output`` of KFP run ``run_id`` is (a cached task: the first run's URI)."""
    with MetadataStore(endpoint) as store:
        return output_uri(*store.run_objects(run_id), task=task, output=output)
