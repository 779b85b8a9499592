"""Deployment files: the KServe InferenceService and its TorchServe config, the Dockerfile and its
container config, and the local config.properties' security settings.

No cluster and no Docker daemon here: the YAML is parsed with ``yaml.safe_load``, the Dockerfile
with a small parser of its instruction syntax, the properties files as TorchServe reads them. The
KServe v1 request shape is pushed through TorchServe's own kserve envelope into the handler's
request parsing.
"""

from __future__ import annotations

import base64
import fnmatch
import json
import re
from urllib.parse import urlparse

import pytest
import yaml
from ts.torch_handler.request_envelope.kserve import KServeEnvelope

from handler.request import Params, parse_params, split_request
from scripts.paths import ROOT
from scripts.serve import read_config

DEPLOY = ROOT / "deploy"
DOCKERFILE_KEYWORDS = {
    "FROM", "RUN", "CMD", "LABEL", "MAINTAINER", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT",
    "VOLUME", "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL",
}  # fmt: skip
# Paths the Dockerfile may COPY that are build outputs: `make demo` archives into model_store/.
BUILD_OUTPUTS = ("model_store/*.mar",)
ADDRESS_KEYS = ("inference_address", "management_address", "metrics_address")
GRPC_KEYS = ("grpc_inference_address", "grpc_management_address")


def host(value: str) -> str:
    """Host of a TorchServe address (``http://127.0.0.1:8080``) or of a bare gRPC bind address."""
    return urlparse(value).hostname if "://" in value else value


def truthy(props: dict[str, str], key: str) -> bool:
    return props.get(key, "false").strip().lower() == "true"


# -- local config.properties -------------------------------------------------------------------------
def test_local_config_is_loopback_with_token_auth():
    props = read_config(ROOT / "config.properties")
    for key in ADDRESS_KEYS + GRPC_KEYS:
        assert host(props[key]) == "127.0.0.1", (key, props[key])
    # token auth is TorchServe's default: nothing may turn it off, not even through the environment
    assert "disable_token_authorization" not in props
    assert not truthy(props, "enable_envvars_config")
    assert not truthy(props, "install_py_dep_per_model")
    # registration only by name from the model store: as written, no URL at all (scripts/serve.py
    # renders one anchored to the absolute store; tests/test_hostile.py checks it on a server)
    allowed = props["allowed_urls"].replace("\\\\", "\\")
    for url in ("file:///srv/model_store/effdet_demo.mar", "http://127.0.0.1:1/x.mar", "file:///x.mar"):
        assert not re.fullmatch(allowed, url), url


# -- Dockerfile ----------------------------------------------------------------------------------------
def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: comments and parser directives skipped, ``\\`` continuations joined."""
    out, buf = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):  # comment lines inside a continuation are dropped
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        keyword, _, args = buf.strip().partition(" ")
        out.append((keyword, args.strip()))
        buf = ""
    assert not buf, "the Dockerfile ends inside a line continuation"
    return out


def copy_sources(args: str) -> list[str]:
    parts = json.loads(args) if args.startswith("[") else args.split()
    parts = [p for p in parts if not p.startswith("--")]  # --chown=..., --from=...
    assert len(parts) >= 2, f"COPY needs a source and a destination: {args}"
    return parts[:-1]


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return parse_dockerfile((DEPLOY / "Dockerfile").read_text())


def test_dockerfile_syntax(dockerfile):
    assert dockerfile, "empty Dockerfile"
    for keyword, args in dockerfile:
        assert keyword in DOCKERFILE_KEYWORDS, f"unknown instruction {keyword!r}"
        assert keyword == keyword.upper()
        if keyword in ("CMD", "ENTRYPOINT", "RUN") and args.startswith("["):
            assert isinstance(json.loads(args), list)  # exec form must be a JSON array
        elif keyword not in ("CMD",):
            assert args, f"{keyword} without arguments"
    assert dockerfile[0][0] == "FROM"
    assert [k for k, _ in dockerfile].count("FROM") == 1


def test_dockerfile_contents(dockerfile):
    text = (DEPLOY / "Dockerfile").read_text()
    assert dockerfile[0][1] == "pytorch/torchserve:0.12.0-cpu"
    assert "pytorch/torchserve:0.12.0-gpu" in text  # the GPU variant is named in a comment
    copies = [copy_sources(args) for k, args in dockerfile if k in ("COPY", "ADD")]
    for sources in copies:
        for src in sources:
            if any(fnmatch.fnmatch(src, pattern) for pattern in BUILD_OUTPUTS):
                continue
            assert list(ROOT.glob(src)), f"COPY source {src} is not in the repo"
    flat = [s for sources in copies for s in sources]
    assert "deploy/config.properties" in flat and "model_store/*.mar" in flat
    # the .mar files come from `make demo`, which archives into model_store/
    from scripts.paths import MODEL_STORE

    assert (
        MODEL_STORE == ROOT / "model_store"
        and "default=str(MODEL_STORE)" in (ROOT / "scripts" / "demo.py").read_text()
    )
    exposed = {p for k, args in dockerfile if k == "EXPOSE" for p in args.split()}
    assert {"8080", "8081", "8082"} <= exposed
    # token auth stays on: nothing that runs disables it, and the base image's `serve` entrypoint
    # (which passes --disable-token-auth) is replaced
    for keyword, args in dockerfile:
        assert "disable-token-auth" not in args and "DISABLE_TOKEN" not in args.upper(), (keyword, args)
    entry = json.loads(next(args for k, args in dockerfile if k == "ENTRYPOINT"))
    assert entry[:2] == ["torchserve", "--start"] and "--foreground" in entry
    config_path = entry[entry.index("--ts-config") + 1]
    dests = [args.split()[-1] for k, args in dockerfile if k == "COPY"]
    assert config_path in dests
    users = [args for k, args in dockerfile if k == "USER"]
    assert users and users[-1] not in ("root", "0")


def test_container_config_binds_all_interfaces_and_keeps_tokens(dockerfile):
    """deploy/config.properties: 0.0.0.0 so published ports reach it; otherwise the local settings."""
    local = read_config(ROOT / "config.properties")
    box = read_config(DEPLOY / "config.properties")
    for key in ADDRESS_KEYS:
        assert host(box[key]) == "0.0.0.0", (key, box[key])
        assert urlparse(box[key]).port == urlparse(local[key]).port
    for key in GRPC_KEYS:
        assert host(box[key]) == "127.0.0.1"  # unused and not exposed
    assert "disable_token_authorization" not in box
    assert not truthy(box, "enable_envvars_config")
    # no drift from the local config except where the container must differ
    differ = {*ADDRESS_KEYS, "model_store", "allowed_urls", "vmargs", "load_models"}
    assert set(local) - differ <= set(box)
    for key in set(local) - differ:
        assert box[key] == local[key], key
    # the model store is where the Dockerfile copies the archives, and only it may be registered from
    mar_dest = next(args.split()[-1] for k, args in dockerfile if k == "COPY" and "model_store/*.mar" in args)
    assert mar_dest.rstrip("/") == box["model_store"]
    allowed = box["allowed_urls"].replace("\\\\", "\\")
    assert re.fullmatch(allowed, f"file://{box['model_store']}/effdet_demo.mar")
    assert not re.fullmatch(allowed, "http://127.0.0.1:1/x.mar")


# -- KServe --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def isvc() -> dict:
    return yaml.safe_load((DEPLOY / "kserve" / "inferenceservice.yaml").read_text())


def test_inferenceservice_fields(isvc):
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    assert isvc["kind"] == "InferenceService"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", isvc["metadata"]["name"])  # a DNS-1035 label
    predictor = isvc["spec"]["predictor"]
    # the current form (model.modelFormat) or the older predictor.pytorch one
    model = predictor.get("model") or predictor["pytorch"]
    if "model" in predictor:
        assert model["modelFormat"]["name"] == "pytorch"
        assert model.get("runtime", "kserve-torchserve") == "kserve-torchserve"
    assert model.get("protocolVersion", "v1") == "v1"
    assert str(model["runtimeVersion"]).startswith("0.12.0")
    uri = urlparse(model["storageUri"])
    assert uri.scheme in ("gs", "s3", "pvc", "https", "azure", "hdfs", "webhdfs")
    # a directory holding config/config.properties and model-store/*.mar, not the .mar itself
    assert not uri.path.endswith(".mar")
    limits, requests_ = model["resources"]["limits"], model["resources"]["requests"]
    assert set(requests_) <= set(limits)


def test_kserve_torchserve_config():
    props = read_config(DEPLOY / "kserve" / "config.properties")
    # KServe's model server (:8080 in the pod) forwards to TorchServe on the pod's loopback at :8085
    for key in ("inference_address", "management_address"):
        assert urlparse(props[key]).hostname == "127.0.0.1" and urlparse(props[key]).port == 8085
    for key in GRPC_KEYS:
        assert host(props[key]) == "127.0.0.1"
    assert props["model_store"] == "/mnt/models/model-store"  # where KServe mounts storageUri
    assert not truthy(props, "enable_model_api")
    assert not truthy(props, "install_py_dep_per_model")
    snapshot = json.loads(props["model_snapshot"])
    assert snapshot["modelCount"] == len(snapshot["models"]) >= 1
    for versions in snapshot["models"].values():
        assert sum(bool(v.get("defaultVersion")) for v in versions.values()) == 1
        for v in versions.values():
            assert v["marName"].endswith(".mar") and "/" not in v["marName"]
            # the kserve envelope answers only the first request of a TorchServe batch
            assert v["batchSize"] == 1
            assert 1 <= v["minWorkers"] <= v["maxWorkers"]


def test_kserve_v1_instances_reach_the_handler():
    """A KServe v1 body through TorchServe's kserve envelope: one image per instance, own parameters."""
    images = [b"\xff\xd8\xff first image bytes", b"\x89PNG second image bytes"]
    payload = {
        "instances": [
            {"image": base64.b64encode(images[0]).decode(), "score_threshold": 0.3, "max_detections": 5},
            {"image": base64.b64encode(images[1]).decode()},
        ]
    }
    defaults = Params(score_threshold=0.05, iou_threshold=0.5, max_detections=100)
    seen = []

    def handle(rows, context):
        for row in rows:
            raw, params = split_request(row)
            seen.append((raw, parse_params(params, defaults, 100)))
        return [{"detections": [], "n": i} for i in range(len(rows))]

    # the frontend hands TorchServe's Python side the parsed JSON body as the request's "body"
    out = KServeEnvelope(handle).handle([{"body": payload}], None)
    assert [raw for raw, _ in seen] == images
    assert seen[0][1] == Params(0.3, 0.5, 5)
    assert seen[1][1] == defaults
    assert out == [{"predictions": [{"detections": [], "n": 0}, {"detections": [], "n": 1}]}]
