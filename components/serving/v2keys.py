"""The keys a V2 (Open Inference Protocol) REST request may hold, checked before KServe parses it.

KServe's pydantic models drop keys they do not know, so a misspelled ``"output"`` or
``"paramters"`` used to be ignored without a word and the request answered as if it were absent.
V1 requests already refuse unknown keys (components/serving/protocol.py); V2 now does too, for the
JSON body and for the binary extension's JSON header alike. The known keys are the protocol's,
plus ``model_name``, which KServe's own REST client writes into every request.
"""

from __future__ import annotations

from kserve.errors import InvalidInput

REQUEST = ("id", "inputs", "outputs", "parameters", "model_name")
TENSOR = ("name", "shape", "datatype", "parameters", "data")
OUTPUT = ("name", "parameters")


def check(body) -> None:
    """Raise InvalidInput naming the first object of a V2 request that holds a key outside the
    protocol. Values of the wrong type are left to the parsers that read them."""
    if not isinstance(body, dict):
        return
    _known(body, REQUEST, "request")
    for field, keys in (("inputs", TENSOR), ("outputs", OUTPUT)):
        items = body.get(field)
        for i, item in enumerate(items if isinstance(items, list) else []):
            if isinstance(item, dict):
                _known(item, keys, f"{field}[{i}]")


def _known(item: dict, keys: tuple[str, ...], where: str) -> None:
    unknown = set(item) - set(keys)
    if unknown:
        raise InvalidInput(f"{where}: unknown key(s) {sorted(unknown)}; known: {list(keys)}")
