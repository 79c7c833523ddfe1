"""The Kubernetes manifests (deploy/kubernetes/), checked offline: every overlay renders with
`kubectl kustomize` and every object validates strictly (an unknown field fails) against the
schema of its kind, and the manifests agree with the code (topics, ACLs, settings, scaling).

Built-in kinds are validated against Kubernetes' own schemas (the `kubernetes-validate`
package, its strict variant) of KUBERNETES_VERSION; Strimzi and KEDA kinds against the
`openAPIV3Schema` of their CRDs at the versions named below, made strict here the way the API
server prunes: an object schema that lists its properties allows no others unless it says
`x-kubernetes-preserve-unknown-fields`. The CRDs are read from the shared folder beside the
repository (../shared/kubernetes/crds/), as they are not the project's to ship.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from app.settings import Settings
from app.topics import ExistingTopic, topic_problems, topic_specs

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "deploy" / "kubernetes"
OVERLAYS = ("dev", "prod")
CRDS = REPO.parent / "shared" / "kubernetes" / "crds"
CRD_FILES = (
    "strimzi-1.2.0/040-Crd-kafka.yaml",
    "strimzi-1.2.0/043-Crd-kafkatopic.yaml",
    "strimzi-1.2.0/044-Crd-kafkauser.yaml",
    "strimzi-1.2.0/045-Crd-kafkanodepool.yaml",
    "keda-2.20.2/keda.sh_scaledobjects.yaml",
    "keda-2.20.2/keda.sh_triggerauthentications.yaml",
)
# The oldest Kubernetes still commonly run whose API has every kind used here (autoscaling/v2,
# policy/v1): a manifest valid for it is valid for the versions after it.
KUBERNETES_VERSION = "1.32"
# A Kubernetes object name (RFC 1123 subdomain): the CRDs do not check metadata, so this does.
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
# The settings of ferry-config that are not Settings fields' FERRY_ names.
SETTINGS_ALIASES = {"KAFKA_BOOTSTRAP_SERVERS": "kafka_bootstrap_servers"}


# -- rendering and validating -------------------------------------------------------------------


@functools.cache
def _render_text(overlay: str) -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        # Not a skip: these machines and CI have kubectl, and a skipped check would pass silently.
        pytest.fail("kubectl is not installed: the manifests cannot be rendered (kubectl kustomize)")
    directory = MANIFESTS / "base" if overlay == "base" else MANIFESTS / "overlays" / overlay
    result = subprocess.run([kubectl, "kustomize", str(directory)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"kubectl kustomize {overlay} failed:\n{result.stderr}"
    return result.stdout


def render(overlay: str) -> list[dict]:
    """The objects of an overlay (or of "base"), as `kubectl kustomize` renders them (a fresh copy
    each call)."""
    return [doc for doc in yaml.safe_load_all(_render_text(overlay)) if doc]


def only(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def strict(schema):
    """The schema with `additionalProperties: false` wherever properties are listed and unknown
    fields are not preserved. Only the structure (properties, items, additionalProperties) is
    walked: branches of oneOf/anyOf/allOf constrain a value, they do not list all of its fields."""
    if not isinstance(schema, dict):
        return schema
    schema = dict(schema)
    if "properties" in schema:
        schema["properties"] = {name: strict(sub) for name, sub in schema["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
    if isinstance(schema.get("items"), dict):
        schema["items"] = strict(schema["items"])
    if isinstance(schema.get("additionalProperties"), dict):
        schema["additionalProperties"] = strict(schema["additionalProperties"])
    return schema


@functools.cache
def crd_validators() -> dict[tuple[str, str], jsonschema.protocols.Validator]:
    """A strict validator per (apiVersion, kind) the CRDs define."""
    if not CRDS.is_dir():
        pytest.fail(f"the CRDs to validate against are missing: {CRDS}")
    validators = {}
    for name in CRD_FILES:
        crd = yaml.safe_load((CRDS / name).read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schema = strict(version["schema"]["openAPIV3Schema"])
            validators[(f"{group}/{version['name']}", kind)] = jsonschema.Draft7Validator(schema)
    return validators


def validation_errors(obj: dict) -> list[str]:
    """Why ``obj`` is not valid for its kind (empty: valid)."""
    where = f"{obj.get('kind')} {obj.get('metadata', {}).get('name')}"
    errors = []
    name = obj.get("metadata", {}).get("name", "")
    if not DNS_SUBDOMAIN.match(name) or len(name) > 253:
        errors.append(f"{where}: metadata.name {name!r} is not a Kubernetes name")
    validator = crd_validators().get((obj["apiVersion"], obj["kind"]))
    if validator is not None:
        errors += [f"{where}: {'.'.join(map(str, e.absolute_path))}: {e.message}"
                   for e in validator.iter_errors(obj)]
        return errors
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        errors.append(f"{where}: {'.'.join(map(str, e.path))}: {e.message}")
    except kubernetes_validate.SchemaNotFoundError as e:
        errors.append(f"{where}: no schema for it ({e.message})")
    return errors


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_strictly(overlay):
    objects = render(overlay)
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap",
            "NetworkPolicy", "ScaledObject", "TriggerAuthentication", "Kafka", "KafkaNodePool",
            "KafkaTopic", "KafkaUser"} <= kinds
    errors = [error for obj in objects for error in validation_errors(obj)]
    assert errors == []
    assert {o["metadata"].get("namespace") for o in objects} == {{"dev": "ferry-dev", "prod": "ferry"}[overlay]}


def test_base_alone_is_ferry_without_its_kafka():
    """What a deployment against a Kafka of its own (MSK, Confluent Cloud) starts from."""
    objects = render("base")
    assert [error for obj in objects for error in validation_errors(obj)] == []
    assert not any(o["apiVersion"].startswith("kafka.strimzi.io/") for o in objects)


def test_a_broken_field_fails_validation():
    objects = render("prod")

    api = only(objects, "Deployment", "ferry-api")
    assert validation_errors(api) == []
    api["spec"]["replica"] = api["spec"].pop("replicas")
    assert any("replica" in error for error in validation_errors(api))

    topic = next(o for o in objects if o["kind"] == "KafkaTopic")
    assert validation_errors(topic) == []
    topic["spec"]["partition"] = topic["spec"].pop("partitions")
    assert any("partition" in error for error in validation_errors(topic))

    # Deeper down, and a value outside an enum.
    scaled = only(objects, "ScaledObject", "ferry-worker")
    scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behaviour"] = {}
    assert any("behaviour" in error for error in validation_errors(scaled))
    user = only(objects, "KafkaUser", "ferry")
    user["spec"]["authorization"]["acls"][0]["operations"] = ["Reed"]
    assert any("Reed" in error for error in validation_errors(user))

    # Where the schema preserves unknown fields, they pass: any broker config of a topic.
    topic = next(o for o in render("prod") if o["kind"] == "KafkaTopic")
    topic["spec"]["config"]["segment.ms"] = "3600000"
    assert validation_errors(topic) == []


# -- the manifests against the code -------------------------------------------------------------


def config_map(objects: list[dict]) -> dict[str, str]:
    return only(objects, "ConfigMap", "ferry-config")["data"]


def settings_of(objects: list[dict], tmp_path: Path, monkeypatch) -> Settings:
    """The Settings a pod of these manifests builds from ferry-config (the mounted files stood
    in for by empty ones here)."""
    for name in [name for name in os.environ if name.startswith("FERRY_")]:
        monkeypatch.delenv(name)
    for name, value in config_map(objects).items():
        if name.endswith("_FILE"):
            stand_in = tmp_path / Path(value).name
            stand_in.write_text("stand-in\n")
            value = str(stand_in)
        monkeypatch.setenv(name, value)
    return Settings()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_config_map_holds_only_settings_and_they_parse(overlay, tmp_path, monkeypatch):
    data = config_map(render(overlay))
    known = {f"FERRY_{field.upper()}" for field in Settings.model_fields} | set(SETTINGS_ALIASES)
    # Settings ignores unknown variables: a misspelled one would be silently without effect.
    assert sorted(set(data) - known) == []
    settings = settings_of(render(overlay), tmp_path, monkeypatch)
    assert settings.declare_topics is False
    assert settings.kafka_security_protocol == "SASL_SSL"
    assert (settings.api_host, settings.worker_web_host) == ("0.0.0.0", "0.0.0.0")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kafka_topics_are_exactly_the_topics_the_code_uses(overlay, tmp_path, monkeypatch):
    objects = render(overlay)
    settings = settings_of(objects, tmp_path, monkeypatch)
    expected = topic_specs(settings)
    topics = {o["spec"]["topicName"]: o for o in objects if o["kind"] == "KafkaTopic"}
    assert sorted(topics) == sorted(expected)
    for name, spec in expected.items():
        topic = topics[name]["spec"]
        assert topic["partitions"] == spec.partitions, name
        assert topic["replicas"] == spec.replication_factor, name
        assert {key: str(value) for key, value in topic["config"].items()} == spec.configs, name
        # And as the processes' start-up check will find them on the brokers.
        found = ExistingTopic(topic["partitions"], topic["replicas"],
                              {key: str(value) for key, value in topic["config"].items()})
        assert topic_problems(settings, spec, found) == [], name
    assert all(o["metadata"]["labels"]["strimzi.io/cluster"] == "ferry"
               for o in objects if o["kind"] in ("KafkaTopic", "KafkaUser", "KafkaNodePool"))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kafka_user_acls_cover_exactly_ferrys_topics_and_group(overlay, tmp_path, monkeypatch):
    objects = render(overlay)
    settings = settings_of(objects, tmp_path, monkeypatch)
    user = only(objects, "KafkaUser", settings.kafka_sasl_username)
    assert user["spec"]["authentication"]["type"] == "scram-sha-512"
    assert settings.kafka_sasl_mechanism == "SCRAM-SHA-512"
    acls = user["spec"]["authorization"]["acls"]
    assert all(acl.get("type", "allow") == "allow" and acl["resource"].get("patternType") == "literal"
               for acl in acls)
    topic_acls = {acl["resource"]["name"]: set(acl["operations"]) for acl in acls if acl["resource"]["type"] == "topic"}
    group_acls = {acl["resource"]["name"]: set(acl["operations"]) for acl in acls if acl["resource"]["type"] == "group"}
    assert sorted(topic_acls) == sorted(topic_specs(settings))
    assert all(ops == {"Read", "Write", "Describe", "DescribeConfigs"} for ops in topic_acls.values())
    assert group_acls == {settings.app_id: {"Read", "Describe"}}
    assert {acl["resource"]["type"] for acl in acls} == {"topic", "group"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_keda_scales_the_workers_on_the_groups_lag(overlay, tmp_path, monkeypatch):
    objects = render(overlay)
    settings = settings_of(objects, tmp_path, monkeypatch)
    scaled = only(objects, "ScaledObject", "ferry-worker")
    assert scaled["spec"]["scaleTargetRef"]["name"] == only(objects, "Deployment", "ferry-worker")["metadata"]["name"]
    assert 1 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"] <= settings.topic_partitions
    (trigger,) = scaled["spec"]["triggers"]
    metadata = trigger["metadata"]
    assert trigger["type"] == "kafka"
    assert metadata["consumerGroup"] == settings.app_id
    assert metadata["bootstrapServers"] == settings.kafka_bootstrap_servers
    # No topic: the lag of every topic the group commits on, the request topics among them.
    assert "topic" not in metadata
    assert int(metadata["lagThreshold"]) > 0
    assert (metadata["sasl"], metadata["tls"]) == ("scram_sha512", "enable")
    auth = only(objects, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    secrets = {(ref["parameter"], ref["name"], ref["key"]) for ref in auth["spec"]["secretTargetRef"]}
    # The Secrets the Deployments mount for the same purposes.
    mounted = {volume["secret"]["secretName"]: volume["secret"]["items"][0]["key"]
               for volume in only(objects, "Deployment", "ferry-worker")["spec"]["template"]["spec"]["volumes"]
               if "secret" in volume}
    assert secrets == {("password", settings.kafka_sasl_username, "password"),
                       ("ca", "ferry-cluster-ca-cert", "ca.crt")}
    assert all(mounted[name] == key for _, name, key in secrets)
    (username,) = auth["spec"]["configMapTargetRef"]
    assert config_map(objects)[username["key"]] == settings.kafka_sasl_username


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployments_as_the_processes_need(overlay, tmp_path, monkeypatch):
    objects = render(overlay)
    settings = settings_of(objects, tmp_path, monkeypatch)
    data = config_map(objects)
    api = only(objects, "Deployment", "ferry-api")["spec"]["template"]["spec"]
    worker = only(objects, "Deployment", "ferry-worker")["spec"]["template"]["spec"]
    assert worker["terminationGracePeriodSeconds"] > settings.worker_shutdown_grace_seconds
    probes = {(name, kind): (c[kind]["httpGet"]["path"], c[kind]["httpGet"]["port"])
              for name, spec in (("api", api), ("worker", worker)) for c in spec["containers"]
              for kind in ("livenessProbe", "readinessProbe")}
    assert probes == {("api", "livenessProbe"): ("/health/live", "http"),
                      ("api", "readinessProbe"): ("/health/ready", "http"),
                      ("worker", "livenessProbe"): ("/health", "web"),
                      ("worker", "readinessProbe"): ("/health/ready", "web")}
    ports = {c["ports"][0]["name"]: c["ports"][0]["containerPort"]
             for spec in (api, worker) for c in spec["containers"]}
    assert ports == {"http": settings.api_port, "web": settings.worker_web_port}
    for spec in (api, worker):
        assert spec["securityContext"]["runAsNonRoot"] is True
        (container,) = spec["containers"]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        # Secrets only by reference: no literal env values at all, everything from ferry-config.
        assert "env" not in container
        # The files ferry-config names are there, from the Secrets Strimzi writes.
        volumes = {v["name"]: v for v in spec["volumes"]}
        secret_files = {f"{m['mountPath']}/{item['path']}": volumes[m["name"]]["secret"]["secretName"]
                        for m in container["volumeMounts"] if "secret" in volumes[m["name"]]
                        for item in volumes[m["name"]]["secret"]["items"]}
        assert secret_files == {data["FERRY_KAFKA_SSL_CA_FILE"]: "ferry-cluster-ca-cert",
                                data["FERRY_KAFKA_SASL_PASSWORD_FILE"]: settings.kafka_sasl_username}
    data_mount = next(m for m in worker["containers"][0]["volumeMounts"]
                      if m["mountPath"] == data["FERRY_WORKER_DATA_DIR"])
    assert "emptyDir" in next(v for v in worker["volumes"] if v["name"] == data_mount["name"])
    assert not any(o["kind"] == "Secret" for o in objects)


@pytest.mark.parametrize(("overlay", "brokers", "replication", "min_isr"), [("dev", 1, 1, 1), ("prod", 3, 3, 2)])
def test_kafka_cluster_shape(overlay, brokers, replication, min_isr):
    objects = render(overlay)
    pool = only(objects, "KafkaNodePool")
    assert pool["spec"]["replicas"] == brokers
    assert set(pool["spec"]["roles"]) == {"controller", "broker"}
    config = only(objects, "Kafka", "ferry")["spec"]["kafka"]["config"]
    assert (config["default.replication.factor"], config["min.insync.replicas"]) == (replication, min_isr)
    assert config["auto.create.topics.enable"] is False
    assert {o["spec"]["replicas"] for o in objects if o["kind"] == "KafkaTopic"} == {replication}
    # The README's first apply step selects the Kafka objects by this label: all of them, nothing else.
    labelled = [o for o in objects if o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "kafka"]
    assert labelled == [o for o in objects if o["apiVersion"].startswith("kafka.strimzi.io/")]
