"""Offline validation of the Kubernetes manifests (no API server can run here): core objects and
every pod template with kubernetes-validate (strict), KubeRay objects (RayCluster, RayJob,
RayService) against k8s/schemas/kuberay.schema.json, a RayService's serveConfigV2 against Ray
Serve's own schema; overlays rendered with `kubectl kustomize`; RayJobs rendered by
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
    """Every pod template of a manifest: Deployments, Jobs, RayCluster groups, a RayJob's own
    cluster (rayClusterSpec) and its submitter pod, a RayService's cluster (rayClusterConfig)."""
    spec = obj.get("spec", {})
    if obj["kind"] in ("Deployment", "Job"):
        yield spec["template"]
    cluster = spec if obj["kind"] == "RayCluster" else spec.get("rayClusterSpec") or spec.get("rayClusterConfig")
    if cluster:
        yield cluster["headGroupSpec"]["template"]
        for group in cluster.get("workerGroupSpecs", []):
            yield group["template"]
    if obj["kind"] == "RayJob" and "submitterPodTemplate" in spec:
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
    objs = rendered(overlay)
    assert {o["kind"] for o in objs} >= {"RayCluster", "RayJob", "Deployment", "Service", "ConfigMap"}
    for obj in objs:
        validate(obj)
    cluster = next(o for o in objs if o["kind"] == "RayCluster")
    gpus = [
        g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
        for g in cluster["spec"]["workerGroupSpecs"]
    ]
    assert gpus == {"gpu": ["1"], "gpu-2x8-moe": ["8"]}.get(overlay, [None])


def test_the_moe_overlay_runs_hsdp_with_expert_parallel_on_two_nodes_of_eight():
    """Its RayJob's command line is a config that loads, with a mesh for its 16 workers: a shard
    group and the experts of every layer on each node of 8 GPUs, 2 replicas across the 2 nodes."""
    from generalmodel.config import load_config
    from generalmodel.train.mesh import MeshShape, check_node_capacity, check_world_sizes

    objs = rendered("gpu-2x8-moe")
    job = next(o for o in objs if o["kind"] == "RayJob" and o["metadata"]["name"] == "generalmodel-pretrain")
    args = job["spec"]["entrypoint"].split()
    assert args[:2] == ["python", "/app/jobs/pretrain.py"]
    overrides = dict(a[2:].split("=", 1) for a in args[2:] if "$" not in a)
    cfg = load_config(overrides=overrides)
    assert cfg.model.name == "deepseek" and cfg.model.moe_experts % cfg.parallel.expert == 0
    shape = check_world_sizes(cfg)
    assert shape == MeshShape(replicate=2, shard=8, expert=8)
    check_node_capacity(cfg.parallel, shape, [8, 8])  # the RayCluster's 2 worker pods of 8 GPUs
    cluster = next(o for o in objs if o["kind"] == "RayCluster")
    assert cluster["spec"]["workerGroupSpecs"][0]["replicas"] == 2


def rendered(overlay):
    out = subprocess.run(
        [kubectl(), "kustomize", str(REPO / "k8s/overlays" / overlay)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def assert_restricted(template, where):
    """The restricted Pod Security Standard, and resource requests/limits on every container."""
    pod = template["spec"]["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["seccompProfile"]["type"] == "RuntimeDefault", where
    for c in template["spec"]["containers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False, where
        assert sc["capabilities"]["drop"] == ["ALL"], where
        assert sc["readOnlyRootFilesystem"] is True, where
        assert c["resources"]["requests"] and c["resources"]["limits"], where
        mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
        assert "/tmp" in mounts, f"{where}: a read-only root needs a writable /tmp"


def test_secrets_only_by_reference_and_pods_meet_the_restricted_standard():
    text = "\n".join(p.read_text() for p in (REPO / "k8s").rglob("*.yaml"))
    assert "kind: Secret" not in text  # credentials are created out of band, never committed
    assert not re.search(r"(SECRET|PASSWORD|TOKEN)\w*\s*[:=]\s*\S", text.replace("secretKeyRef", ""))
    objs = [("base/" + name, o) for name, o in base_manifests()]
    objs += (
        [(f"overlays/{o}", obj) for o in ("gpu", "local-cpu") for obj in rendered(o)] if shutil.which("kubectl") else []
    )
    checked = 0
    for name, obj in objs:
        for template in pod_templates(obj):
            assert_restricted(template, f"{name} {obj['kind']} {obj['metadata']['name']}")
            checked += 1
    assert checked >= 8


def test_jobs_get_a_bucket_user_not_the_store_admin():
    """Only MinIO and its setup Job see the admin Secret; everything else gets the bucket user."""
    for name, obj in base_manifests():
        for template in pod_templates(obj):
            refs = json.dumps(template)
            owner = obj["metadata"]["name"]
            if "generalmodel-s3-admin" in refs:
                assert owner in ("generalmodel-s3", "generalmodel-s3-setup"), f"{name}: {owner} sees the admin"
    setup = next(o for _, o in base_manifests() if o["metadata"]["name"] == "generalmodel-s3-policy")
    policy = json.loads(setup["data"]["bucket-policy.json"])
    resources = {r for st in policy["Statement"] for r in st["Resource"]}
    assert resources == {"arn:aws:s3:::generalmodel", "arn:aws:s3:::generalmodel/*"}


def test_mlflow_and_the_store_stay_inside_the_cluster():
    objs = {(o["kind"], o["metadata"]["name"]): o for _, o in base_manifests()}
    for name in ("generalmodel-mlflow", "generalmodel-s3"):
        assert objs[("Service", name)]["spec"].get("type", "ClusterIP") == "ClusterIP"
        policy = objs[("NetworkPolicy", name)]["spec"]
        assert policy["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": name}
        assert policy["ingress"][0]["from"] == [
            {"podSelector": {"matchLabels": {"app.kubernetes.io/part-of": "generalmodel"}}}
        ]
    if shutil.which("kubectl"):  # the pods the policies admit carry the label
        for obj in rendered("gpu"):
            for template in pod_templates(obj):
                assert template["metadata"]["labels"]["app.kubernetes.io/part-of"] == "generalmodel", obj["kind"]


def test_the_standalone_rayjob_brings_its_own_cluster_and_shuts_it_down():
    job = yaml.safe_load((REPO / "k8s/base/rayjob-standalone.yaml").read_text())
    cluster = yaml.safe_load((REPO / "k8s/base/raycluster.yaml").read_text())
    assert job["spec"]["shutdownAfterJobFinishes"] is True and "clusterSelector" not in job["spec"]
    own = job["spec"]["rayClusterSpec"]
    assert own["rayVersion"] == cluster["spec"]["rayVersion"]
    assert own["headGroupSpec"] == cluster["spec"]["headGroupSpec"]
    assert [g["template"] for g in own["workerGroupSpecs"]] == [
        g["template"] for g in cluster["spec"]["workerGroupSpecs"]
    ]
    kustomization = yaml.safe_load((REPO / "k8s/base/kustomization.yaml").read_text())
    assert "rayjob-standalone.yaml" not in kustomization["resources"]  # applying the base starts no run


def test_the_rayservice_deploys_the_openai_app_on_the_clusters_spec():
    """Its serveConfigV2 is a valid Serve config (Ray's own schema), its import path is our app
    builder, its args a valid ServeConfig; its cluster is raycluster.yaml's plus Serve's port."""
    from ray.serve.schema import ServeDeploySchema

    from generalmodel.serve.app import ServeConfig, build_app

    service = yaml.safe_load((REPO / "k8s/base/rayservice-serve.yaml").read_text())
    validate(service)
    config = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    (app,) = config.applications
    module, name = app.import_path.split(":")
    assert getattr(__import__(module, fromlist=[name]), name) is build_app
    args = ServeConfig.model_validate(app.args)
    assert args.model.startswith("models:/") and args.device == "cuda" and args.autoscaling is not None
    assert config.http_options.host == "0.0.0.0"  # inside its pod; the Service in front is a ClusterIP
    cluster = yaml.safe_load((REPO / "k8s/base/raycluster.yaml").read_text())["spec"]
    own = copy.deepcopy(service["spec"]["rayClusterConfig"])
    ports = own["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]
    assert {"name": "serve", "containerPort": 8000} in ports
    ports.remove({"name": "serve", "containerPort": 8000})
    assert own == cluster
    kustomization = yaml.safe_load((REPO / "k8s/base/kustomization.yaml").read_text())
    assert "rayservice-serve.yaml" not in kustomization["resources"]  # a model must be registered first
    bad = copy.deepcopy(service)
    bad["spec"]["serveConfigV2"] = bad["spec"]["serveConfigV2"].replace("max_batch:", "max_bacth:")
    with pytest.raises(ValueError, match="max_bacth"):
        ServeConfig.model_validate(
            ServeDeploySchema.model_validate(yaml.safe_load(bad["spec"]["serveConfigV2"])).applications[0].args
        )


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


def test_submit_renders_an_rl_rayjob(capsys):
    args = ["--k8s.job=rl", "--config", "configs/reasoning-rl.yaml", "--rl.rollout_workers=8", "--k8s.dry_run"]
    manifest = submit_k8s.main(args)
    validate(manifest)
    entry = manifest["spec"]["entrypoint"]
    assert entry.startswith("python /app/jobs/rl.py --config=/app/configs/reasoning-rl.yaml --rl.rollout_workers=8")
    assert manifest["metadata"]["name"].startswith("rl-")
    with pytest.raises(SystemExit):  # the RL section is validated before anything is rendered
        submit_k8s.main(["--k8s.job=rl", "--rl.group_size=1", "--k8s.dry_run"])


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
