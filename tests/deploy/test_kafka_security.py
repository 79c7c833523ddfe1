"""Ferry against a secured Kafka: a job end to end over a SASL_SSL listener with SCRAM-SHA-512,
and the start-up check's one line for a wrong password, an untrusted certificate and a mechanism
the listener does not enable.

The test's broker is a real Apache Kafka of its own (the local broker with its optional SASL_SSL
listener); the CA and certificates are made here, and the SCRAM user by Kafka's storage tool.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import random
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiokafka.errors import KafkaError
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from app.kafka_clients import client_options, verify_connection
from app.settings import Settings
from deploy.fakes.openai_server import FakeOpenAI
from deploy.kafka.broker import LocalKafka
from deploy.processes import FerryProcess
from tests.helpers import (
    bindable,
    ferry_settings_for,
    free_port_pair,
    poll_until_done,
    start_api,
    submit,
    worker_running,
)

USER = "ferry"
PASSWORD = "s3cret-scram-password-7f1c"
WRONG_PASSWORD = "not-the-password-0d2e"


# -- certificates ----------------------------------------------------------------------------------

def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject: str, key, issuer: str, issuer_key, *, ca: bool, hosts: tuple[str, ...] = ()):
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject)).issuer_name(_name(issuer))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
            decipher_only=False), critical=True)
    else:
        names = [x509.IPAddress(ipaddress.ip_address(h)) if h[0].isdigit() else x509.DNSName(h) for h in hosts]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


@dataclass
class Certificates:
    ca_file: Path  # the CA that signed the broker's certificate and the client's
    other_ca_file: Path  # a CA that did not
    broker_keystore: Path  # the broker's key (PKCS#8) and certificate chain, as Kafka's PEM keystore
    client_cert: Path  # Ferry's client certificate, for mutual TLS
    client_key: Path  # its key, encrypted with the password in client_key_password
    client_key_password: Path


def make_certificates(directory: Path) -> Certificates:
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, other_key, broker_key, client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(4))
    ca = _certificate("Ferry test CA", ca_key, "Ferry test CA", ca_key, ca=True)
    other_ca = _certificate("Some other CA", other_key, "Some other CA", other_key, ca=True)
    broker = _certificate("kafka", broker_key, "Ferry test CA", ca_key, ca=False, hosts=("127.0.0.1", "localhost"))
    client = _certificate("ferry", client_key, "Ferry test CA", ca_key, ca=False, hosts=("ferry",))
    paths = Certificates(directory / "ca.pem", directory / "other-ca.pem", directory / "broker-keystore.pem",
                         directory / "client.pem", directory / "client-key.pem", directory / "client-key-password")
    paths.ca_file.write_bytes(_pem(ca))
    paths.other_ca_file.write_bytes(_pem(other_ca))
    key = broker_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption())
    paths.broker_keystore.write_bytes(key + _pem(broker) + _pem(ca))
    paths.client_cert.write_bytes(_pem(client))
    paths.client_key_password.write_text("client-key-password\n")
    paths.client_key.write_bytes(client_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"client-key-password")))
    return paths


# -- the secured broker ----------------------------------------------------------------------------

@dataclass
class SecuredBroker:
    broker: LocalKafka
    certificates: Certificates

    @property
    def listener(self) -> str:
        return f"127.0.0.1:{self.broker.sasl_ssl_port}"


def _free_port(taken: set[int]) -> int:
    for _ in range(200):
        port = random.randrange(21000, 29000)
        if port not in taken and bindable(port):
            return port
    raise RuntimeError("no free port")


@pytest.fixture(scope="module")
def secured_broker(tmp_path_factory: pytest.TempPathFactory) -> SecuredBroker:
    """A broker of this module's own with a SASL_SSL listener (SCRAM-SHA-512 only, client
    certificates required) beside its PLAINTEXT one; the user ``ferry`` is created at format time
    by Kafka's storage tool."""
    home = tmp_path_factory.mktemp("secured-kafka")
    certificates = make_certificates(home / "tls")
    port = free_port_pair()
    broker = LocalKafka(home=home / "kafka", port=port, heap="512m", sasl_ssl_port=_free_port({port, port + 1}),
                        ssl_keystore_pem=certificates.broker_keystore, ssl_client_truststore_pem=certificates.ca_file,
                        sasl_mechanisms=("SCRAM-SHA-512",),
                        sasl_users={USER: PASSWORD})
    broker.start()
    yield SecuredBroker(broker, certificates)
    broker.stop()


def secured_settings(secured: SecuredBroker, tmp_path: Path, **overrides) -> Settings:
    values = dict(
        kafka_bootstrap_servers=secured.listener,  # the SASL_SSL listener only
        kafka_security_protocol="SASL_SSL",
        kafka_ssl_ca_file=str(secured.certificates.ca_file),
        kafka_ssl_cert_file=str(secured.certificates.client_cert),
        kafka_ssl_key_file=str(secured.certificates.client_key),
        kafka_ssl_key_password_file=str(secured.certificates.client_key_password),
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username=USER,
        kafka_sasl_password=PASSWORD,
        worker_data_dir=str(tmp_path / "faust"),
        app_id=f"ferry-{tmp_path.name[-20:]}",
        topic_prefix=f"ferry-{tmp_path.name[-20:]}",
        topic_partitions=2,
    )
    return Settings(**(values | overrides))


# -- a job over SASL_SSL ---------------------------------------------------------------------------

@pytest.mark.timeout(240)
async def test_a_job_runs_end_to_end_over_sasl_ssl_with_scram_and_a_client_certificate(
        secured_broker: SecuredBroker, tmp_path: Path, fake_openai: FakeOpenAI) -> None:
    # The password from a file, as a mounted Secret gives it.
    password_file = tmp_path / "kafka-password"
    password_file.write_text(PASSWORD + "\n")
    secured = secured_settings(secured_broker, tmp_path, kafka_sasl_password=None,
                               kafka_sasl_password_file=str(password_file))
    settings = ferry_settings_for(secured, fake_openai)
    await verify_connection(settings)
    api = await start_api(settings)
    try:
        async with worker_running(settings):
            body = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "over TLS"}]}
            job = await poll_until_done(api, (await submit(api, body))["id"], timeout=120)
    finally:
        await api.close()
    assert job["status"] == "completed" and job["status_code"] == 200
    assert fake_openai.requests, "the fake provider was never called"


# -- failures at start: one line naming the listener and what failed -------------------------------

def run_to_exit(module: str, settings: Settings, workdir: Path) -> tuple[int, str]:
    process = FerryProcess(module, settings, workdir).start()
    try:
        code = process.process.wait(timeout=90)  # a guard against a retry loop; it exits in seconds
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"python -m {module} kept running: {(workdir / f'{module}.log').read_text()[-2000:]}")
    return code, (workdir / f"{module}.log").read_text()


FAILURES = {
    "wrong password": (dict(kafka_sasl_password=WRONG_PASSWORD),
                       "authentication failed for user 'ferry'"),
    "untrusted certificate": ("other_ca", "the broker's certificate is not trusted"),
    "wrong mechanism": (dict(kafka_sasl_mechanism="SCRAM-SHA-256"),
                        "SASL mechanism SCRAM-SHA-256 is not enabled on this listener"),
    "no client certificate": ("no_cert", "the listener refused the TLS handshake"),
}


def failing_settings(case: str, secured: SecuredBroker, tmp_path: Path) -> Settings:
    overrides, _ = FAILURES[case]
    if overrides == "other_ca":
        overrides = dict(kafka_ssl_ca_file=str(secured.certificates.other_ca_file))
    elif overrides == "no_cert":
        overrides = dict(kafka_ssl_cert_file=None, kafka_ssl_key_file=None, kafka_ssl_key_password_file=None)
    return secured_settings(secured, tmp_path, **overrides)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("module", ["api", "workers"])
@pytest.mark.parametrize("case", list(FAILURES))
def test_a_process_with_wrong_security_settings_exits_at_start_with_one_line(
        case: str, module: str, secured_broker: SecuredBroker, tmp_path: Path) -> None:
    code, output = run_to_exit(module, failing_settings(case, secured_broker, tmp_path), tmp_path / "run")

    assert code == 1
    lines = output.strip().splitlines()
    assert "Traceback" not in output
    assert len(lines) == 1, output
    line = lines[0]
    assert line.startswith(f"cannot connect to Kafka listener {secured_broker.listener}: "), line
    assert FAILURES[case][1] in line
    mechanism = "SCRAM-SHA-256" if case == "wrong mechanism" else "SCRAM-SHA-512"
    assert line.endswith(f"(SASL_SSL, {mechanism} as 'ferry')"), line
    assert PASSWORD not in output and WRONG_PASSWORD not in output


async def test_the_check_passes_with_the_right_settings_and_names_the_cause_otherwise(
        secured_broker: SecuredBroker, tmp_path: Path) -> None:
    await verify_connection(secured_settings(secured_broker, tmp_path))
    for case, (_, reason) in FAILURES.items():
        with pytest.raises(SystemExit) as exited:
            await verify_connection(failing_settings(case, secured_broker, tmp_path))
        assert reason in str(exited.value), case


async def test_a_plaintext_client_at_the_tls_listener_is_warned_about(
        secured_broker: SecuredBroker, caplog: pytest.LogCaptureFixture) -> None:
    # A TLS listener drops a plain client as a restarting broker would: the check cannot tell the
    # two apart, so it warns, naming the listener, and the process goes on as when Kafka is down.
    await verify_connection(Settings(kafka_bootstrap_servers=secured_broker.listener))
    warnings = [r.getMessage() for r in caplog.records if r.name == "app.kafka_clients"]
    assert len(warnings) == 1 and warnings[0].startswith(f"cannot reach Kafka listener {secured_broker.listener}: ")


# -- the password stays secret ---------------------------------------------------------------------

async def test_the_password_is_never_in_repr_or_in_the_logs_of_a_failed_connection(
        secured_broker: SecuredBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = secured_settings(secured_broker, tmp_path, kafka_sasl_password=WRONG_PASSWORD)
    assert WRONG_PASSWORD not in repr(settings) and WRONG_PASSWORD not in str(settings)
    assert WRONG_PASSWORD not in str(settings.model_dump())

    from aiokafka import AIOKafkaProducer
    caplog.set_level(logging.DEBUG)
    with pytest.raises(SystemExit) as exited:
        await verify_connection(settings)
    producer = AIOKafkaProducer(**client_options(settings))
    with pytest.raises(KafkaError):
        await asyncio.wait_for(producer.start(), 30)  # aiokafka's own failure, logged its way
    await producer.stop()

    logged = "\n".join(f"{record.getMessage()} {record.exc_text or ''}" for record in caplog.records)
    assert "authentication failed" in str(exited.value)
    assert "Authentication failed" in logged or "SaslAuthenticationFailed" in logged, logged[-2000:]
    assert WRONG_PASSWORD not in logged and WRONG_PASSWORD not in str(exited.value)


def test_incomplete_security_settings_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="SASL_SSL needs kafka_sasl_mechanism, kafka_sasl_username"):
        Settings(kafka_security_protocol="SASL_SSL")
    with pytest.raises(ValueError, match="kafka_ssl_cert_file and kafka_ssl_key_file go together"):
        Settings(kafka_security_protocol="SSL", kafka_ssl_cert_file=__file__)
    with pytest.raises(ValueError, match="uses no SASL") as refused:
        Settings(kafka_sasl_password=PASSWORD)
    assert PASSWORD not in str(refused.value)


@pytest.mark.parametrize("protocol", ["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"])
def test_faust_gets_the_same_security_as_every_other_client(protocol: str, tmp_path: Path) -> None:
    from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

    from app.kafka_clients import faust_broker_options

    certificates = make_certificates(tmp_path)
    values: dict = dict(kafka_bootstrap_servers="127.0.0.1:9093", kafka_security_protocol=protocol)
    if protocol.endswith("SSL"):
        values |= dict(kafka_ssl_ca_file=str(certificates.ca_file), kafka_ssl_cert_file=str(certificates.client_cert),
                       kafka_ssl_key_file=str(certificates.client_key),
                       kafka_ssl_key_password_file=str(certificates.client_key_password))
    if protocol.startswith("SASL_"):
        values |= dict(kafka_sasl_mechanism="PLAIN", kafka_sasl_username=USER, kafka_sasl_password=PASSWORD)
    settings = Settings(**values)

    faust_auth = credentials_to_aiokafka_auth(faust_broker_options(settings).get("broker_credentials"))
    expected = {key: value for key, value in client_options(settings).items() if key != "bootstrap_servers"}
    assert {key: value for key, value in faust_auth.items() if value is not None} == expected
    assert PASSWORD not in repr(faust_broker_options(settings))
