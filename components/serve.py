"""Step 6 (deploy_target="local") — serve: the winner behind the KServe predictor on 127.0.0.1,
smoke-tested against the same artifact in-process (components/serving/check.py), then stopped.

    python -m components.serve predict IMAGE [--url http://127.0.0.1:8080] [--top-k 3]
    python -m components.serve check [--summary runs/latest/summary.json]
"""

import argparse
import json
import os
import sys
from pathlib import Path

from kfp.dsl import Artifact, Input, Model, Output

from components.kfp_step import step
from components.serving.client import MODEL_NAME, image_instances, post_json


def serve_winner(model_dir: str, backend: str, result_path: str) -> dict:
    """Serve and check; the outcome is written to ``result_path`` and returned."""
    from components.serving.check import serve_and_check

    outcome = serve_and_check(model_dir, backend)
    Path(result_path).write_text(json.dumps(outcome, indent=2) + "\n")
    print(f"serve: {backend} served at {outcome['url']} answers like the artifact "
          f"(max probability gap {outcome['max_probability_gap']:.1e}; {', '.join(outcome['checks'])})", flush=True)
    return outcome


@step("serve")
def serve(model: Input[Model], backend: str, result: Output[Artifact]) -> str:
    """Serve the winner with the KServe predictor on 127.0.0.1 and check its answers."""
    from components.serve import serve_winner

    return serve_winner(model.path, backend, result.path)["url"]


# --------------------------------------------------------------------------- CLI
def print_answer(image: Path, status: int, answer: dict) -> None:
    if status != 200:
        print(f"{image.name}: HTTP {status}: {answer.get('error', answer)}")
        return
    prediction = answer["predictions"][0]
    print(f"{image.name}: class {prediction['class_id']} \"{prediction['class_name']}\" "
          f"probability {prediction['probability']:.4f}")
    for t in prediction.get("top_k", [])[1:]:
        print(f"  then class {t['class_id']} \"{t['class_name']}\" probability {t['probability']:.4f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="send one image to a running predictor and print the answer")
    p.add_argument("image", type=Path)
    p.add_argument("--url", default=os.environ.get("PREDICTOR_URL", "http://127.0.0.1:8080"))
    p.add_argument("--model-name", default=MODEL_NAME)
    p.add_argument("--top-k", type=int, default=3)
    c = sub.add_parser("check", help="serve the latest run-local model locally and smoke-test it")
    c.add_argument("--summary", default="runs/latest/summary.json")
    args = parser.parse_args(argv)
    if args.command == "predict":
        return predict(args.image, args.url, args.model_name, args.top_k)
    from components.local_run import NotServable, serving_target
    from components.serving.check import serve_and_check

    try:
        target = serving_target(args.summary)
    except NotServable as e:
        print(f"check: {e}", file=sys.stderr)
        return 1
    print(json.dumps(serve_and_check(*target), indent=2))
    return 0


def predict(image: Path, url: str, model_name: str, top_k: int) -> int:
    """Send ``image`` to the predictor at ``url`` and print its answer; a problem is one line on stderr."""
    try:
        data = image.read_bytes()
    except OSError as e:
        print(f"predict: cannot read {image}: {e.strerror or e}", file=sys.stderr)
        return 1
    body = {"instances": image_instances([data]), "parameters": {"top_k": top_k}}
    try:
        status, answer = post_json(f"{url}/v1/models/{model_name}:predict", body)
    except OSError as e:                  # refused, unreachable, timed out (urllib's URLError is one)
        reason = getattr(e, "reason", e)
        print(f"predict: no predictor answers at {url} ({getattr(reason, 'strerror', None) or reason}): "
              "start it with `make serve`, or check SERVE_PORT", file=sys.stderr)
        return 1
    except ValueError:                    # an answer that is not JSON: something else listens there
        print(f"predict: the answer from {url} is not JSON: is another server listening on SERVE_PORT?",
              file=sys.stderr)
        return 1
    print_answer(image, status, answer)
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
