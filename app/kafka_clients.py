"""How every Kafka client in Ferry connects: the security settings as aiokafka and Faust take
them, and a start-up check that the brokers accept them.

``client_options(settings)`` is passed to every aiokafka client Ferry makes (the API's producer
and read model, the admin clients, the worker's request reader, the benchmark's producer);
``faust_broker_options(settings)`` gives Faust's app the same as ``broker_credentials``, which
its aiokafka driver turns into the same keyword arguments for its consumer, producer and admin.

``verify_connection(settings)`` runs at the start of ``python -m api`` and ``python -m workers``.
aiokafka, given a wrong password, an untrusted certificate or a mechanism the listener does not
enable, logs the cause at ERROR and raises only "Unable to bootstrap from [...]"; its callers
retry that (an ERROR line each time) and in the end report that no broker answered, which
points at the network rather than at the settings. The check opens one connection itself and
turns such a failure into one line that names the listener and the cause (SystemExit).
A listener that does not answer is not such a failure: the API serves and reconnects while
Kafka is down, so the check only warns then.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
from typing import Any

from aiokafka.conn import create_conn
from aiokafka.errors import (
    IllegalSaslStateError,
    KafkaConnectionError,
    KafkaError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
)

from app.settings import Settings

log = logging.getLogger(__name__)

# How long one bootstrap listener has to accept a connection, TLS and SASL included.
CHECK_TIMEOUT_SECONDS = 15.0


# One context per TLS configuration, made once and shared by every client of the process.
@functools.lru_cache(maxsize=8)
def _ssl_context(ca_file: str | None, cert_file: str | None, key_file: str | None,
                 key_password_file: str | None, check_hostname: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca_file)
    context.check_hostname = check_hostname
    if cert_file:
        key_password = None
        if key_password_file:
            with open(key_password_file) as secret:
                key_password = secret.read().strip()
        context.load_cert_chain(cert_file, key_file, password=key_password)
    return context


def _cached_ssl_context(settings: Settings) -> ssl.SSLContext:
    return _ssl_context(settings.kafka_ssl_ca_file, settings.kafka_ssl_cert_file, settings.kafka_ssl_key_file,
                        settings.kafka_ssl_key_password_file, settings.kafka_ssl_check_hostname)


def client_options(settings: Settings) -> dict[str, Any]:
    """The keyword arguments that make an aiokafka client (producer, consumer, admin) connect as
    ``settings`` say: ``AIOKafkaProducer(**client_options(settings), ...)``."""
    protocol = settings.kafka_security_protocol
    options: dict[str, Any] = {
        "bootstrap_servers": settings.require_bootstrap_servers(),
        "security_protocol": protocol,
    }
    if protocol.endswith("SSL"):
        options["ssl_context"] = _cached_ssl_context(settings)
    if protocol.startswith("SASL_"):
        options["sasl_mechanism"] = settings.kafka_sasl_mechanism
        options["sasl_plain_username"] = settings.kafka_sasl_username
        options["sasl_plain_password"] = settings.kafka_sasl_password_value()
    return options


def faust_broker_options(settings: Settings) -> dict[str, Any]:
    """Options for ``faust.App``: ``broker_credentials`` matching ``client_options`` (empty for
    PLAINTEXT). Faust's aiokafka driver passes them to its consumer, producer and admin client."""
    import faust  # here, so that the API, which has no Faust app, does not load Faust

    protocol = settings.kafka_security_protocol
    if protocol == "PLAINTEXT":
        return {}
    if protocol == "SSL":
        return {"broker_credentials": faust.SSLCredentials(_cached_ssl_context(settings))}
    credentials = faust.SASLCredentials(
        username=settings.kafka_sasl_username,
        password=settings.kafka_sasl_password_value(),
        mechanism=settings.kafka_sasl_mechanism,
        # Faust makes a SASL_SSL credential exactly when it is given a context.
        ssl_context=_cached_ssl_context(settings) if protocol == "SASL_SSL" else None,
    )
    return {"broker_credentials": credentials}


def _listeners(bootstrap_servers: str) -> list[tuple[str, int]]:
    listeners = []
    for server in bootstrap_servers.split(","):
        server = server.strip()
        if server:
            host, _, port = server.rpartition(":")
            listeners.append((host.strip("[]") or server, int(port) if port.isdigit() else 9092))
    return listeners


def _describe(settings: Settings) -> str:
    protocol = settings.kafka_security_protocol
    if protocol.startswith("SASL_"):
        return f"{protocol}, {settings.kafka_sasl_mechanism} as {settings.kafka_sasl_username!r}"
    return protocol


class _Fatal(Exception):
    """A failure that retrying cannot mend: the settings or the listener's setup must change."""


def _reason(settings: Settings, exc: BaseException) -> tuple[bool, str]:
    """(fatal, what failed) for a failed connection attempt."""
    if isinstance(exc, KafkaConnectionError) and isinstance(exc.__cause__, ssl.SSLError):
        # The listener's TLS alert (e.g. "certificate required") ends the first read after the
        # handshake (TLS 1.3); aiokafka reports "connection closed" with the alert as its cause.
        return True, (f"the listener refused the TLS handshake ({exc.__cause__.reason or exc.__cause__}); "
                      "does it require a client certificate (FERRY_KAFKA_SSL_CERT_FILE) that it trusts?")
    if isinstance(exc, ssl.SSLCertVerificationError):
        # verify_code 62 is OpenSSL's hostname mismatch; the others are trust-chain failures.
        if exc.verify_code == 62:
            return True, (f"the broker's certificate does not name this host ({exc.verify_message}); "
                          "connect by a name it has, or set FERRY_KAFKA_SSL_CHECK_HOSTNAME=false")
        return True, (f"the broker's certificate is not trusted ({exc.verify_message}); "
                      "FERRY_KAFKA_SSL_CA_FILE must name the CA that signed it")
    if isinstance(exc, ssl.SSLError):
        return True, (f"the listener refused the TLS handshake ({exc.reason or exc}); is it a TLS listener, "
                      "and does it accept this client's certificate?")
    if isinstance(exc, UnsupportedSaslMechanismError):
        return True, (f"SASL mechanism {settings.kafka_sasl_mechanism} is not enabled on this listener"
                      + (f" ({exc.args[0]})" if exc.args and isinstance(exc.args[0], str) else ""))
    if isinstance(exc, (SaslAuthenticationFailed, IllegalSaslStateError)):
        return True, (f"authentication failed for user {settings.kafka_sasl_username!r} "
                      "(wrong password, unknown user, or a mechanism the user has no credentials for)")
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return False, f"no answer within {CHECK_TIMEOUT_SECONDS:.0f} s"
    if isinstance(exc, KafkaConnectionError) and settings.kafka_security_protocol in ("PLAINTEXT", "SASL_PLAINTEXT"):
        # A TLS listener drops a client that speaks plain Kafka at once.
        return False, f"connection closed during the handshake ({exc}); is it a TLS listener?"
    return False, f"{type(exc).__name__}: {exc}"


async def _try_listener(settings: Settings, host: str, port: int) -> None:
    options = client_options(settings)
    async with asyncio.timeout(CHECK_TIMEOUT_SECONDS):
        connection = await create_conn(
            host, port, client_id="ferry-connection-check",
            request_timeout_ms=int(CHECK_TIMEOUT_SECONDS * 1000),
            ssl_context=options.get("ssl_context"), security_protocol=options["security_protocol"],
            sasl_mechanism=options.get("sasl_mechanism"), sasl_plain_username=options.get("sasl_plain_username"),
            sasl_plain_password=options.get("sasl_plain_password"),
        )
    connection.close()


async def verify_connection(settings: Settings) -> None:
    """Connect once to the bootstrap listeners with ``settings``' security; returns when one
    accepts. Exits (SystemExit, one line naming each listener and what failed) when they refuse
    the TLS or SASL settings; only warns when none answers (the clients keep trying)."""
    failures: list[str] = []
    fatal = False
    for host, port in _listeners(settings.require_bootstrap_servers()):
        try:
            await _try_listener(settings, host, port)
            return
        except (OSError, KafkaError, TimeoutError) as exc:
            is_fatal, reason = _reason(settings, exc)
            fatal = fatal or is_fatal
            failures.append(f"{host}:{port}: {reason}")
    summary = f"Kafka listener {'; '.join(failures)} ({_describe(settings)})"
    if fatal:
        raise SystemExit(f"cannot connect to {summary}")
    log.warning("cannot reach %s; the Kafka clients keep trying", summary)
