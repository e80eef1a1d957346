"""Offline validation of the Kubernetes manifests (no API server can run here): core objects and
every pod template with kubernetes-validate (strict), KubeRay objects against
k8s/schemas/kuberay.schema.json; overlays rendered with `kubectl kustomize`; RayJobs rendered by
jobs/submit_k8s.py; broken manifests must fail."""

import copy
import json
import os
import re
import shutil
import subprocess

import jsonschema
import kubernetes_validate
import pytest
import yaml
from conftest import REPO

from jobs import submit_k8s

K8S_VERSION = "1.33.0"
SCHEMA = json.loads((REPO / "k8s/schemas/kuberay.schema.json").read_text())


def pod_templates(obj):
    spec = obj["spec"]
    if obj["kind"] == "RayCluster":
        yield spec["headGroupSpec"]["template"]
        for group in spec.get("workerGroupSpecs", []):
            yield group["template"]
    elif obj["kind"] == "RayJob" and "submitterPodTemplate" in spec:
        yield spec["submitterPodTemplate"]


def validate(obj):
    """Raise if `obj` is not a valid manifest."""
    if obj["apiVersion"] == "ray.io/v1":
        jsonschema.validate(obj, SCHEMA)
        for i, template in enumerate(pod_templates(obj)):
            kubernetes_validate.validate(
                {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"t{i}"}, "template": template},
                K8S_VERSION,
                strict=True,
            )
    else:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def base_manifests():
    docs = []
    for path in sorted((REPO / "k8s/base").glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


@pytest.mark.parametrize("name, obj", base_manifests(), ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_base_manifests_are_valid(name, obj):
    validate(obj)


def kubectl():
    if shutil.which("kubectl") is None:
        if os.environ.get("CI"):
            pytest.fail("kubectl (for `kubectl kustomize`) is not installed")
        pytest.skip("kubectl is not installed")
    return "kubectl"


@pytest.mark.parametrize("overlay", sorted(p.name for p in (REPO / "k8s/overlays").iterdir()))
def test_rendered_overlays_are_valid(overlay):
    out = subprocess.run(
        [kubectl(), "kustomize", str(REPO / "k8s/overlays" / overlay)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    objs = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert {o["kind"] for o in objs} >= {"RayCluster", "RayJob", "Deployment", "Service", "ConfigMap"}
    for obj in objs:
        validate(obj)
    cluster = next(o for o in objs if o["kind"] == "RayCluster")
    gpus = [
        g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
        for g in cluster["spec"]["workerGroupSpecs"]
    ]
    assert gpus == (["1"] if overlay == "gpu" else [None])


def test_secrets_only_by_reference_and_hardened_pods():
    text = "\n".join(p.read_text() for p in (REPO / "k8s").rglob("*.yaml"))
    assert "kind: Secret" not in text  # credentials are created out of band, never committed
    assert not re.search(r"(SECRET|PASSWORD|TOKEN)\w*\s*[:=]\s*\S", text.replace("secretKeyRef", ""))
    for _, obj in base_manifests():
        templates = (
            list(pod_templates(obj))
            if obj["apiVersion"] == "ray.io/v1"
            else ([obj["spec"]["template"]] if obj["kind"] == "Deployment" else [])
        )
        for template in templates:
            assert template["spec"]["securityContext"]["runAsNonRoot"] is True
            for c in template["spec"]["containers"]:
                assert c["securityContext"]["allowPrivilegeEscalation"] is False
                assert c["resources"]["requests"] and c["resources"]["limits"]


def test_ray_version_is_pinned_to_the_image():
    dockerfile = (REPO / "Dockerfile").read_text()
    image_ray = re.search(r"ray\[[^\]]*\]==([0-9.]+)", dockerfile).group(1)
    cluster = yaml.safe_load((REPO / "k8s/base/raycluster.yaml").read_text())
    assert cluster["spec"]["rayVersion"] == image_ray
    shm = [v for v in cluster["spec"]["headGroupSpec"]["template"]["spec"]["volumes"] if v["name"] == "shm"]
    assert shm and shm[0]["emptyDir"]["medium"] == "Memory"


def broken(mutate):
    cluster = copy.deepcopy(yaml.safe_load((REPO / "k8s/base/raycluster.yaml").read_text()))
    mutate(cluster)
    return cluster


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c: c["spec"].pop("rayVersion"),
        lambda c: c["spec"].__setitem__("workerGroupSpec", c["spec"].pop("workerGroupSpecs")),  # a typo
        lambda c: c["spec"]["workerGroupSpecs"][0].__setitem__("replicas", "two"),
        lambda c: c["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].__setitem__("imagePullPolicy", 3),
        lambda c: c["spec"]["headGroupSpec"]["template"]["spec"].__setitem__("container", []),  # a typo
    ],
    ids=["no-rayVersion", "typo-workerGroupSpec", "replicas-string", "bad-pull-policy-type", "typo-container"],
)
def test_broken_manifests_fail(mutate):
    with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError)):
        validate(broken(mutate))


def test_broken_core_object_fails():
    deployment = next(o for _, o in base_manifests() if o["kind"] == "Deployment")
    deployment = copy.deepcopy(deployment)
    deployment["spec"]["replica"] = deployment["spec"].pop("replicas")
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)


def test_submit_renders_a_valid_rayjob(capsys):
    manifest = submit_k8s.main(["--config", "configs/llama-tiny.yaml", "--train.steps", "2000", "--k8s.dry_run"])
    validate(manifest)
    assert yaml.safe_load(capsys.readouterr().out) == manifest
    entry = manifest["spec"]["entrypoint"]
    assert "--config=/app/configs/llama-tiny.yaml --train.steps=2000" in entry
    assert "--storage.root=$GENERALMODEL_STORE" in entry


def test_submit_refuses_bad_config_and_credentials_and_says_when_no_cluster(tmp_path, monkeypatch, capsys):
    for args, message in [
        (["--train.stepz=5", "--k8s.dry_run"], "unknown key 'train.stepz'"),
        (["--storage.secret_access_key=abc", "--k8s.dry_run"], "would put a credential in the RayJob"),
        ([], "no usable kube-context"),
    ]:
        monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing-kubeconfig"))
        with pytest.raises(SystemExit) as e:
            submit_k8s.main(args)
        assert e.value.code == 2
        assert message in capsys.readouterr().err
