"""deploy/k8s/*.yaml: every object validates against Kubernetes' own OpenAPI schemas
(kubernetes-validate, strict: unknown fields are errors), and the objects fit together: the
Service selects the Deployment's pods and targets its named ports, readiness is Triton's
/v2/health/ready, the HPA scales that Deployment on a metric Triton exports, and the
container serves the repository the PVC mounts with the model `llama-trt package` names."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"


def _objects() -> dict[str, dict]:
    objs = {}
    for f in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            if doc:
                objs[doc["kind"]] = doc
    return objs


def test_every_manifest_validates_against_the_kubernetes_schema():
    kv = pytest.importorskip("kubernetes_validate", reason="pip install -e .[dev] installs kubernetes-validate")
    from kubernetes_validate.utils import latest_version

    objs = _objects()
    assert set(objs) == {"Deployment", "Service", "HorizontalPodAutoscaler", "PersistentVolumeClaim"}
    version = latest_version()
    for kind, obj in objs.items():
        kv.validate(obj, version, strict=True)  # raises ValidationError naming the field
    import copy

    broken = copy.deepcopy(objs["Deployment"])  # the validator does reject a wrong manifest: a typo'd field
    c = broken["spec"]["template"]["spec"]["containers"][0]
    c["readinesProbe"] = c.pop("readinessProbe")
    with pytest.raises(kv.ValidationError, match="readinesProbe"):
        kv.validate(broken, version, strict=True)


def test_the_objects_fit_together():
    objs = _objects()
    dep, svc, hpa, pvc = (objs[k] for k in ("Deployment", "Service", "HorizontalPodAutoscaler",
                                           "PersistentVolumeClaim"))
    pod = dep["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert svc["spec"]["selector"].items() <= labels.items()
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= set(ports)
    ready = container["readinessProbe"]["httpGet"]
    assert ready["path"] == "/v2/health/ready" and ports[ready["port"]] == 8000
    args = container["args"]
    assert f"--http-port={ports['http']}" in args and f"--grpc-port={ports['grpc']}" in args
    assert f"--metrics-port={ports['metrics']}" in args
    # the repository argument is the PVC's mount, and the model is the one `package` writes
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"]
              if "persistentVolumeClaim" in v}
    (vol,) = [n for n, c in claims.items() if c == pvc["metadata"]["name"]]
    assert args[0] == mounts[vol]
    assert any(a.startswith("--model=") and a.endswith("_generate") for a in args)
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", dep["metadata"]["name"])
    (metric,) = hpa["spec"]["metrics"]
    # a gauge Triton exports per model (tests/serve/test_triton_server.py reads it from a real server)
    assert metric["pods"]["metric"]["name"] == "nv_inference_pending_request_count"


def test_the_container_args_are_accepted_by_triton_serve():
    """The Deployment's args parse as `llama-trt triton-serve` options (click, no server started)."""
    import click

    from llama_trt.serve.commands import triton_serve_cmd

    args = _objects()["Deployment"]["spec"]["template"]["spec"]["containers"][0]["args"]
    ctx = triton_serve_cmd.make_context("triton-serve", list(args), resilient_parsing=False)
    assert isinstance(ctx, click.Context)
    assert ctx.params["models"] == ("llama_generate",) and ctx.params["host"] == "0.0.0.0"
