"""deploy/k8s: kustomize renders the base and the example overlay; kubeconform validates what
it renders, offline, against Kubernetes's schemas and KEDA's CRDs; and the manifests agree with
the code: settings that exist, the groups and topics of `ragstream.topology`, probes on the
metrics port, a grace period that covers a worker's drain.

kustomize and kubeconform are Go programs that `make tools` installs into tools/bin. The
Kubernetes schemas come from the kubernetes-validate package (a dev dependency), made
self-contained here; KEDA's from its CRDs in deploy/k8s/schemas.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import tomllib
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from consumers.worker import shutdown_bound_s
from ragstream.settings import SECRET_KEYS, Settings, load_settings
from ragstream.topology import COST, Stage, Topology

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.33.0"
CONSUMERS = (*(s.value for s in Stage), COST)
# The peak RSS of one stage or accountant process in benchmarks/bench_pipeline.py (README:
# Throughput), which the memory requests are sized from.
WORKER_RSS_MIB = 125
SECRET_VARS = {"RAGSTREAM_" + key.upper().replace(".", "__") for key in SECRET_KEYS}

Doc = dict[str, Any]


def tool(name: str) -> str:
    installed = ROOT / "tools" / "bin" / name
    if installed.is_file():
        return str(installed)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: run `make tools` (it installs into tools/bin)")
    return found


def render(overlay: str) -> list[Doc]:
    out = subprocess.run(
        [tool("kustomize"), "build", str(K8S / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.fixture(scope="module", params=["base", "overlays/production"])
def docs(request: pytest.FixtureRequest) -> list[Doc]:
    return render(request.param)


def find(docs: list[Doc], kind: str, name: str) -> Doc:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind} {name}: {len(found)} found"
    return found[0]


def container(deployment: Doc) -> Doc:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    assert isinstance(only, dict)
    return only


# -- schemas, offline --------------------------------------------------------------------------


def _core_schema(kind_file: Path) -> Doc:
    """One of kubernetes-validate's schemas with every definition it reaches copied in, so
    kubeconform needs no other file."""
    definitions = json.loads((kind_file.parent / "_definitions.json").read_text())["$defs"]
    text = kind_file.read_text().replace('"/api/_definitions.json#/', '"#/')
    schema: Doc = json.loads(text)
    schema.pop("$id", None)
    needed: dict[str, Any] = {}
    todo = re.findall(r'"#/\$defs/([^"]+)"', text)
    while todo:
        name = todo.pop()
        if name not in needed:
            needed[name] = definitions[name]
            todo += re.findall(r'"#/\$defs/([^"]+)"', json.dumps(definitions[name]))
    schema["$defs"] = needed
    return schema


def _strict(node: Any) -> Any:
    """A CRD's openAPIV3Schema as kubeconform reads it (as its openapi2jsonschema does): no
    fields beyond those named unless the CRD keeps unknown fields there; int-or-string as
    either."""
    if isinstance(node, list):
        return [_strict(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _strict(value) for key, value in node.items()}
    if out.pop("x-kubernetes-int-or-string", False):
        out["oneOf"] = [{"type": "string"}, {"type": "integer"}]
    if "properties" in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("additionalProperties", False)
    return out


def _crd_schemas() -> Iterator[tuple[str, Doc]]:
    for path in sorted((K8S / "schemas").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"].lower()
        for version in crd["spec"]["versions"]:
            schema = _strict(version["schema"]["openAPIV3Schema"])
            yield f"{group}/{kind}_{version['name']}.json", schema


def _kubernetes_schemas() -> Path:
    import kubernetes_validate

    source = (
        Path(kubernetes_validate.__file__).parent
        / "kubernetes-json-schema"
        / f"v{KUBERNETES_VERSION}-local-strict"
    )
    assert source.is_dir(), f"kubernetes-validate has no schemas for {KUBERNETES_VERSION}"
    return source


@pytest.fixture(scope="module")
def schemas(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory kubeconform reads schemas from: the CRDs' (`<group>/<kind>_<version>.json`)
    here, Kubernetes's kinds (`v<version>-standalone-strict/<kind>-<group>-<version>.json`)
    as `kubeconform` needs them."""
    out = tmp_path_factory.mktemp("schemas")
    (out / f"v{KUBERNETES_VERSION}-standalone-strict").mkdir()
    for name, schema in _crd_schemas():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(json.dumps(schema))
    return out


def kubeconform(docs: list[Doc], schemas: Path) -> dict[str, Any]:
    """kubeconform's verdict on `docs`."""
    source = _kubernetes_schemas()
    for doc in docs:
        group, _, version = doc["apiVersion"].rpartition("/")
        suffix = f"-{group.split('.')[0]}-{version}" if group else f"-{version}"
        name = f"{doc['kind'].lower()}{suffix}.json"
        path = schemas / f"v{KUBERNETES_VERSION}-standalone-strict" / name
        if (source / name).is_file() and not path.exists():
            path.write_text(json.dumps(_core_schema(source / name)))
    out = subprocess.run(
        [
            tool("kubeconform"),
            "-strict",
            "-summary",
            "-output=json",
            f"-kubernetes-version={KUBERNETES_VERSION}",
            "-schema-location="
            + str(schemas)
            + "/{{ .NormalizedKubernetesVersion }}-standalone{{ .StrictSuffix }}"
            + "/{{ .ResourceKind }}{{ .KindSuffix }}.json",
            "-schema-location="
            + str(schemas)
            + "/{{ .Group }}/{{ .ResourceKind }}_{{ .ResourceAPIVersion }}.json",
            "-",
        ],
        input=yaml.safe_dump_all(docs),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.stdout, out.stderr
    verdict: dict[str, Any] = json.loads(out.stdout)
    return verdict


def test_the_manifests_are_valid_kubernetes_and_keda(docs: list[Doc], schemas: Path) -> None:
    verdict = kubeconform(docs, schemas)
    assert verdict["resources"] == [], json.dumps(verdict["resources"], indent=1)
    summary = verdict["summary"]
    assert summary == {"valid": len(docs), "invalid": 0, "errors": 0, "skipped": 0}


def test_the_schemas_catch_mistakes(schemas: Path) -> None:
    """The schemas in use reject mistakes: a misspelt field of a Deployment, a field
    ScaledObject does not have, a number where KEDA wants a string, a list where a
    PodDisruptionBudget wants a number."""
    docs = render("base")
    broken = copy.deepcopy(
        [d for d in docs if d["kind"] in ("Deployment", "ScaledObject", "PodDisruptionBudget")]
    )
    parse = find(broken, "Deployment", "ragstream-parse")
    container(parse)["livenessProbe"]["httpGet"]["prot"] = 9464
    scaled = find(broken, "ScaledObject", "ragstream-embed")
    scaled["spec"]["maxReplicas"] = 12
    find(broken, "ScaledObject", "ragstream-chunk")["spec"]["triggers"][0]["metadata"][
        "lagThreshold"
    ] = 100
    find(broken, "PodDisruptionBudget", "ragstream-cost")["spec"]["maxUnavailable"] = [1]
    verdict = kubeconform(broken, schemas)
    invalid = {(r["kind"], r["name"]): r["msg"] for r in verdict["resources"]}
    assert set(invalid) == {
        ("Deployment", "ragstream-parse"),
        ("ScaledObject", "ragstream-embed"),
        ("ScaledObject", "ragstream-chunk"),
        ("PodDisruptionBudget", "ragstream-cost"),
    }, invalid
    assert "prot" in invalid["Deployment", "ragstream-parse"]
    assert "maxReplicas" in invalid["ScaledObject", "ragstream-embed"]


# -- agreement with the code -------------------------------------------------------------------


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def setting_exists(var: str) -> bool:
    """Does `RAGSTREAM_<SECTION>__<KEY>` name a setting (not a section) of `Settings`?"""
    node: Any = Settings
    for part in var.removeprefix("RAGSTREAM_").lower().split("__"):
        if typing.get_origin(node) is dict:
            return True  # a table of named entries (budgets.tenants.<id>)
        if not _is_section(node) or part not in node.model_fields:
            return False
        node = node.model_fields[part].annotation
    return not _is_section(node)


def environment(docs: list[Doc], pod: Doc) -> dict[str, str]:
    """The variables a container gets: its ConfigMaps' data, then its own `env` (a secret's
    value as a stand-in)."""
    env: dict[str, str] = {}
    for source in pod.get("envFrom", []):
        env.update(find(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    for var in pod.get("env", []):
        env[var["name"]] = var.get("value", "from-a-secret")
    return env


def pod_settings(docs: list[Doc], pod: Doc, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The settings a container starts with."""
    for name in list(os.environ):
        if name.startswith("RAGSTREAM_"):
            monkeypatch.delenv(name)
    for name, value in environment(docs, pod).items():
        monkeypatch.setenv(name, value)
    return load_settings()  # a wrong value or an unknown key in a section raises ConfigError


def pods(docs: list[Doc]) -> Iterator[tuple[str, Doc]]:
    for doc in docs:
        if doc["kind"] in ("Deployment", "Job"):
            for c in doc["spec"]["template"]["spec"]["containers"]:
                yield doc["metadata"]["name"], c


def test_every_variable_names_a_setting_and_secrets_come_from_the_secret(
    docs: list[Doc], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, pod in pods(docs):
        env = environment(docs, pod)
        unknown = [var for var in env if not setting_exists(var)]
        assert unknown == [], f"{name}: no such setting: {unknown}"
        from_secrets = {
            var["name"]: var["valueFrom"]["secretKeyRef"]
            for var in pod["env"]
            if "secretKeyRef" in var.get("valueFrom", {})
        }
        assert set(from_secrets) == SECRET_VARS, name
        assert {ref["name"] for ref in from_secrets.values()} == {"ragstream"}
        assert not from_secrets["RAGSTREAM_POSTGRES__PASSWORD"].get("optional", False)
        assert all("value" not in var for var in pod["env"] if var["name"] in SECRET_VARS)
        settings = pod_settings(docs, pod, monkeypatch)
        assert settings.postgres.password is not None
    for config_map in (d for d in docs if d["kind"] == "ConfigMap"):
        assert not SECRET_VARS & set(config_map["data"]), "a secret in a ConfigMap"


def test_each_group_has_a_deployment_a_budget_and_a_scaler(
    docs: list[Doc], monkeypatch: pytest.MonkeyPatch
) -> None:
    with (ROOT / "config" / "ragstream.toml").open("rb") as fh:
        default_partitions = tomllib.load(fh)["kafka"]["partitions"]
    for consumer in CONSUMERS:
        name = f"ragstream-{consumer}"
        deployment = find(docs, "Deployment", name)
        pod = container(deployment)
        assert pod["command"] == ["ragstream", "worker", consumer]
        assert "replicas" not in deployment["spec"], f"{name}: KEDA owns the replica count"
        settings = pod_settings(docs, pod, monkeypatch)
        topology = Topology(settings.kafka.topic_prefix)

        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
        budget = find(docs, "PodDisruptionBudget", name)["spec"]
        assert budget["selector"]["matchLabels"].items() <= labels.items()
        others = [
            d["spec"]["template"]["metadata"]["labels"]
            for d in docs
            if d["kind"] == "Deployment" and d is not deployment
        ]
        assert not any(budget["selector"]["matchLabels"].items() <= o.items() for o in others)
        assert budget.get("maxUnavailable") == 1

        scaled = find(docs, "ScaledObject", name)["spec"]
        assert scaled["scaleTargetRef"]["name"] == name
        assert scaled["minReplicaCount"] >= 1
        assert scaled["maxReplicaCount"] == settings.kafka.partitions == default_partitions
        (trigger,) = scaled["triggers"]
        meta = trigger["metadata"]
        assert trigger["type"] == "kafka"
        assert meta["consumerGroup"] == topology.group(consumer)
        assert meta["topic"] == topology.input_topic(consumer)
        assert int(meta["lagThreshold"]) > 0
        assert meta["offsetResetPolicy"] == "earliest"  # as the consumers start
        servers_var = meta["bootstrapServersFromEnv"]
        assert environment(docs, pod)[servers_var] == settings.kafka.bootstrap_servers


def _port(pod: Doc, port: int | str) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in pod["ports"] if p["name"] == port]
    assert isinstance(number, int)
    return number


def test_probes_and_scraping_use_the_metrics_port(
    docs: list[Doc], monkeypatch: pytest.MonkeyPatch
) -> None:
    deployments = [f"ragstream-{c}" for c in CONSUMERS] + ["ragstream-exporter"]
    for name in deployments:
        deployment = find(docs, "Deployment", name)
        pod = container(deployment)
        obs = pod_settings(docs, pod, monkeypatch).observability
        assert obs.metrics_host == "0.0.0.0"  # reachable on the pod's IP
        port = obs.exporter_port if name == "ragstream-exporter" else obs.metrics_port
        live, ready = pod["livenessProbe"]["httpGet"], pod["readinessProbe"]["httpGet"]
        assert (live["path"], _port(pod, live["port"])) == ("/healthz", port), name
        assert (ready["path"], _port(pod, ready["port"])) == ("/ready", port), name
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/path"] == "/metrics"
        assert int(annotations["prometheus.io/port"]) == port, name


def test_the_grace_period_covers_a_workers_drain(
    docs: list[Doc], monkeypatch: pytest.MonkeyPatch
) -> None:
    for consumer in CONSUMERS:
        deployment = find(docs, "Deployment", f"ragstream-{consumer}")
        pod = container(deployment)
        command = pod["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "sleep"
        bound = float(command[1]) + shutdown_bound_s(pod_settings(docs, pod, monkeypatch))
        grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        margin = 5  # a loaded node
        assert grace >= bound + margin, f"{consumer}: {grace} s for a stop of up to {bound} s"


def mebibytes(quantity: str) -> float:
    """A Kubernetes memory quantity (`384Mi`, `4Gi`, bytes) in MiB."""
    for unit, factor in (("Ki", 1 / 1024), ("Mi", 1.0), ("Gi", 1024.0)):
        if quantity.endswith(unit):
            return float(quantity.removesuffix(unit)) * factor
    return float(quantity) / 2**20


def cores(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def test_resources_follow_the_benchmark(docs: list[Doc], monkeypatch: pytest.MonkeyPatch) -> None:
    for name, pod in pods(docs):
        requests, limits = pod["resources"]["requests"], pod["resources"]["limits"]
        assert cores(requests["cpu"]) <= cores(limits["cpu"]), name
        assert WORKER_RSS_MIB < mebibytes(requests["memory"]) <= mebibytes(limits["memory"])
    for consumer in ("parse", "chunk"):
        pod = container(find(docs, "Deployment", f"ragstream-{consumer}"))
        children = getattr(pod_settings(docs, pod, monkeypatch), consumer)
        # A child over its own limit is dead-lettered; the pod's limit must not come first.
        room = WORKER_RSS_MIB + children.workers * children.memory_mb
        assert mebibytes(pod["resources"]["limits"]["memory"]) >= room, consumer


def test_the_base_runs_the_image_compose_builds() -> None:
    docs = render("base")
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    uid = re.search(r"useradd [^&]*--uid (\d+)", (ROOT / "Dockerfile").read_text())
    assert uid is not None
    for name, pod in pods(docs):
        assert pod["image"] == compose["x-ragstream"]["image"], name
    for doc in docs:
        if doc["kind"] in ("Deployment", "Job"):
            security = doc["spec"]["template"]["spec"]["securityContext"]
            assert security["runAsNonRoot"] is True
            assert security["runAsUser"] == int(uid.group(1))


def test_the_secret_keys_agree_with_the_readme_and_keda(docs: list[Doc]) -> None:
    """The README's `kubectl create secret` names the keys the pods read, and KEDA reads the
    Kafka password from the key the workers do."""
    refs = {
        var["name"]: var["valueFrom"]["secretKeyRef"]
        for _, pod in pods(docs)
        for var in pod["env"]
        if "secretKeyRef" in var.get("valueFrom", {})
    }
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Kubernetes") :].split("\n## ", 1)[0]
    assert set(re.findall(r"--from-literal=([a-z-]+)=", section)) == {
        ref["key"] for ref in refs.values()
    }
    for auth in (d for d in docs if d["kind"] == "TriggerAuthentication"):
        (password,) = [r for r in auth["spec"]["secretTargetRef"] if r["parameter"] == "password"]
        kafka = refs["RAGSTREAM_KAFKA__SASL_PASSWORD"]
        assert (password["name"], password["key"]) == (kafka["name"], kafka["key"])
        workers = [container(find(docs, "Deployment", f"ragstream-{c}")) for c in CONSUMERS]
        for var in auth["spec"].get("env", []):
            assert setting_exists(var["name"]), var
            assert all(var["name"] in environment(docs, pod) for pod in workers), var
