"""Ferry's configuration: one frozen pydantic-settings class, read from the environment once.

Every variable is ``FERRY_<FIELD>`` in upper case (``FERRY_API_PORT``), except the broker
address, which also answers to the conventional ``KAFKA_BOOTSTRAP_SERVERS``. The README lists
them all. Nothing else in Ferry reads the environment: processes build one ``Settings`` at
start-up and pass it down.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, PrivateAttr, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.jobs import RequestType
from app.providers import CATALOGUE, CUSTOM_FAMILY, CUSTOM_TYPES, ProviderEndpoint


class ProviderConfig(BaseModel):
    """One provider's configuration, as given in ``FERRY_PROVIDERS`` (JSON)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    base_url: str | None = None
    api_key: SecretStr | None = None
    api_key_env: str | None = Field(None, description="Environment variable holding the key.")
    timeout_seconds: float | None = Field(None, gt=0)
    max_concurrency: int | None = Field(None, ge=1, description="Calls at once, per worker.")
    requests_per_minute: int | None = Field(None, ge=1, description="Call starts per minute, per worker.")
    api_version: str | None = Field(None, description="Azure only: the api-version query parameter.")
    request_types: list[RequestType] | None = Field(
        None, description="What the provider serves, replacing the catalogue's list (a vLLM that reranks)."
    )
    enabled: bool = True


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="FERRY_", frozen=True, extra="ignore", populate_by_name=True,
        # A refused value is named, never echoed: the input holds passwords and provider keys.
        hide_input_in_errors=True,
    )

    # -- Kafka ------------------------------------------------------------------------------
    kafka_bootstrap_servers: str | None = Field(
        default=None,
        validation_alias=AliasChoices("KAFKA_BOOTSTRAP_SERVERS", "FERRY_KAFKA_BOOTSTRAP_SERVERS"),
        description="Comma-separated host:port list. Unset: `make run` and the tests find or "
        "start a broker (deploy/kafka/locate.py); the API and worker refuse to start.",
    )
    local_kafka_port: int = Field(19092, description="Port of the local development broker.")
    local_kafka_cluster_port: int = Field(
        29192, description="First client port of the local three-node cluster (`make cluster`): node n listens "
        "on this port + 2(n-1) and its controller on the next port (29192-29197 by default)."
    )
    app_id: str = Field("ferry", description="Faust app id: consumer group and changelog names.")
    topic_prefix: str = Field("ferry", description="Prefix of every request topic name.")
    topic_partitions: int = Field(
        8, ge=1, description="Partitions of every request topic and of the jobs table."
    )
    topic_replication_factor: int = Field(
        1, ge=1, description="Replicas of every topic Ferry declares (production: 3)."
    )
    declare_topics: bool = Field(
        True, description="Create the topics that are missing at start. Off: no process creates or alters a "
        "topic (Faust's own included); the operator creates them (app/topics.py topic_specs). Either way "
        "each process checks at start that its topics exist with the partitions and configs Ferry needs, "
        "and exits with the list of what is missing or different."
    )
    request_retention_seconds: int = Field(
        7 * 24 * 3600, ge=1, description="retention.ms of the request topics and the job-events topic, in "
        "seconds: a job's request is read again when a worker resumes it, so it must outlive the job "
        "(job_max_attempts x job_deadline_seconds at most, plus the time it may wait in a backlog)."
    )
    dead_letter_retention_seconds: int = Field(
        14 * 24 * 3600, ge=1, description="retention.ms of the dead-letter topic, in seconds: how long the "
        "requests of poison jobs stay there for inspection and replay."
    )

    @model_validator(mode="after")
    def _check_request_retention(self) -> Settings:
        """A request deleted while its job can still run would make a resumed job fail as gone."""
        longest_job = self.job_max_attempts * self.job_deadline_seconds
        if self.request_retention_seconds <= longest_job:
            raise ValueError(
                f"request_retention_seconds={self.request_retention_seconds} must exceed job_max_attempts x "
                f"job_deadline_seconds = {longest_job:g} s (the longest a job can run), plus room for a backlog"
            )
        return self

    # -- Kafka security ---------------------------------------------------------------------------
    # Every Kafka client (API, worker, admin, benchmark) takes these, through app/kafka_clients.py.
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="How clients talk to the brokers: PLAINTEXT, SSL (TLS), SASL_PLAINTEXT "
        "or SASL_SSL (SASL over TLS)."
    )
    kafka_ssl_ca_file: str | None = Field(
        None, description="PEM file of the CA(s) that signed the brokers' certificates (SSL, SASL_SSL). "
        "Unset: the system's trusted CAs."
    )
    kafka_ssl_cert_file: str | None = Field(
        None, description="PEM client certificate (chain) for mutual TLS; needs kafka_ssl_key_file."
    )
    kafka_ssl_key_file: str | None = Field(None, description="PEM private key of kafka_ssl_cert_file.")
    kafka_ssl_key_password_file: str | None = Field(
        None, description="File holding the password of an encrypted kafka_ssl_key_file."
    )
    kafka_ssl_check_hostname: bool = Field(
        True, description="Check that a broker's certificate names the host connected to. Off only for "
        "brokers reached by an address their certificates do not name."
    )
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        None, description="SASL mechanism (SASL_PLAINTEXT, SASL_SSL)."
    )
    kafka_sasl_username: str | None = Field(None, description="SASL user name.")
    kafka_sasl_password: SecretStr | None = Field(
        None, description="SASL password (FERRY_KAFKA_SASL_PASSWORD); never logged. Or kafka_sasl_password_file."
    )
    kafka_sasl_password_file: str | None = Field(
        None, description="File holding the SASL password (a mounted Secret), read when a client is made."
    )

    @model_validator(mode="after")
    def _check_kafka_security(self) -> Settings:
        """Refuses combinations that could only fail at the broker, naming the variables to set."""
        protocol = self.kafka_security_protocol
        sasl_fields = {"kafka_sasl_mechanism": self.kafka_sasl_mechanism,
                       "kafka_sasl_username": self.kafka_sasl_username,
                       "kafka_sasl_password": self.kafka_sasl_password,
                       "kafka_sasl_password_file": self.kafka_sasl_password_file}
        ssl_fields = {"kafka_ssl_ca_file": self.kafka_ssl_ca_file, "kafka_ssl_cert_file": self.kafka_ssl_cert_file,
                      "kafka_ssl_key_file": self.kafka_ssl_key_file,
                      "kafka_ssl_key_password_file": self.kafka_ssl_key_password_file}
        if protocol.startswith("SASL_"):
            missing = [name for name in ("kafka_sasl_mechanism", "kafka_sasl_username") if not sasl_fields[name]]
            if self.kafka_sasl_password is None and not self.kafka_sasl_password_file:
                missing.append("kafka_sasl_password or kafka_sasl_password_file")
            if missing:
                raise ValueError(f"FERRY_KAFKA_SECURITY_PROTOCOL={protocol} needs {', '.join(missing)}")
            if self.kafka_sasl_password is not None and self.kafka_sasl_password_file:
                raise ValueError("set kafka_sasl_password or kafka_sasl_password_file, not both")
        elif unused := [name for name, value in sasl_fields.items() if value]:
            raise ValueError(f"{', '.join(unused)} set, but FERRY_KAFKA_SECURITY_PROTOCOL={protocol} uses no SASL")
        if protocol.endswith("SSL"):
            if bool(self.kafka_ssl_cert_file) != bool(self.kafka_ssl_key_file):
                raise ValueError("kafka_ssl_cert_file and kafka_ssl_key_file go together (mutual TLS)")
            if self.kafka_ssl_key_password_file and not self.kafka_ssl_key_file:
                raise ValueError("kafka_ssl_key_password_file is set without kafka_ssl_key_file")
            for name, path in ssl_fields.items():
                if path and not os.path.isfile(path):
                    raise ValueError(f"{name}={path}: no such file")
        elif unused := [name for name, value in ssl_fields.items() if value]:
            raise ValueError(f"{', '.join(unused)} set, but FERRY_KAFKA_SECURITY_PROTOCOL={protocol} uses no TLS")
        if self.kafka_sasl_password_file and not os.path.isfile(self.kafka_sasl_password_file):
            raise ValueError(f"kafka_sasl_password_file={self.kafka_sasl_password_file}: no such file")
        return self

    def kafka_sasl_password_value(self) -> str | None:
        """The SASL password, from the setting or read from its file now (a rotated Secret is picked
        up by the next client made)."""
        if self.kafka_sasl_password is not None:
            return self.kafka_sasl_password.get_secret_value()
        if self.kafka_sasl_password_file:
            with open(self.kafka_sasl_password_file) as secret:
                return secret.read().strip()
        return None

    # -- API ----------------------------------------------------------------------------------
    api_host: str = Field("127.0.0.1", description="Address the API listens on.")
    api_port: int = Field(8080, description="Port the API listens on.")
    api_header_timeout_seconds: float = Field(
        10.0, gt=0, description="How long a client may take to send a request's headers, counted from "
        "the connection's opening or, on a kept-alive connection, from the request's first byte; then "
        "408 (if part of a request came) and the connection is closed. Real clients send headers in one "
        "packet; 10 s frees a slowloris client's slot quickly."
    )
    api_keepalive_timeout_seconds: float = Field(
        65.0, gt=0, description="How long a kept-alive connection may stay idle between a response and "
        "the next request before the API closes it. Above the 60 s upstream idle timeout of AWS ALB and "
        "nginx, so that a proxy never sends a submit on a connection the API has just closed (a 502); "
        "idle connections cannot starve new ones: at api_max_connections they are closed first."
    )
    api_body_timeout_seconds: float = Field(
        30.0, gt=0, description="How long a request body may take, plus one second per "
        "api_body_min_rate_bytes_per_second bytes received (Apache mod_reqtimeout's rule); a slower "
        "body is answered 408 and its connection closed."
    )
    api_body_min_rate_bytes_per_second: int = Field(
        8192, ge=1, description="The slowest a request body may arrive after api_body_timeout_seconds "
        "(8 KiB/s = 64 kbit/s: a 26 MiB upload may take 55 min, a byte-a-second client is cut off)."
    )
    api_max_connections: int = Field(
        4096, ge=1, description="Most client connections the API holds open (lowered at start to fit "
        "the open-file limit, whose soft value is raised to the hard one). At the cap a new connection "
        "closes the one that has waited longest without a request in progress (idle, or still sending "
        "headers), so a health probe gets through while slow clients hold slots; it is refused only "
        "when every connection has a request in progress."
    )
    api_access_log: bool = Field(
        False, description="Log one line per request (aiohttp's access log, at INFO). Off: every poll "
        "would be a line."
    )
    max_request_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, description="Largest accepted submit body; larger is 413."
    )
    submit_timeout_seconds: float = Field(
        5.0, gt=0, description="How long a submit waits for Kafka to store the job (acknowledged by "
        "every in-sync replica) before answering 503. Above the brokers' failover time (a dead node "
        "fenced and a new leader elected: about 3 s with the broker settings in the README), so that "
        "losing a broker delays submits instead of refusing them."
    )
    read_wait_seconds: float = Field(
        2.0, ge=0, description="How long a poll of an unknown id waits for the API's view of "
        "the jobs table to catch up before answering 404."
    )
    max_upload_bytes: int = Field(
        26 * 1024 * 1024, ge=1024, description="Largest accepted multipart submit (audio, images); "
        "larger is 413. The default admits OpenAI's 25 MB audio limit plus the form's overhead."
    )
    max_result_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, description="Largest job result stored (speech audio is base64 "
        "in it); a provider answer that would exceed it fails the job with 502."
    )
    default_result_ttl_seconds: int = Field(3600, ge=1, description="Result TTL by default.")
    max_result_ttl_seconds: int = Field(
        7 * 24 * 3600, ge=1, description="Cap on x-bf-async-job-result-ttl."
    )
    max_fallbacks: int = Field(
        10, ge=0, description="Most fallbacks a submit may name; more is 400 (each one can cost "
        "a round of provider calls)."
    )

    # -- Worker ---------------------------------------------------------------------------------
    worker_web_host: str = Field(
        "127.0.0.1", description="Address the worker's web server (health pages) listens on; a container "
        "sets 0.0.0.0 so that its probes reach it."
    )
    worker_web_port: int = Field(6066, description="Port of the worker's health endpoint.")
    worker_data_dir: str = Field(".local/faust", description="Where Faust keeps its local files.")
    worker_table_store: Literal["rocksdb", "memory"] = Field(
        "rocksdb", description="Where a worker keeps the jobs table: RocksDB files under worker_data_dir "
        "(memory stays flat however many jobs it holds) or memory (no files; grows with the jobs held)."
    )
    worker_max_in_flight: int = Field(
        2000, ge=1, description="Provider calls one worker process runs at once; more jobs wait in Kafka."
    )
    worker_maintenance_interval_seconds: float = Field(
        2.0, gt=0, description="How often a worker looks for expired jobs and orphaned ones."
    )
    worker_processing_record_after_seconds: float = Field(
        0.05, ge=0, description="A call that ends sooner is recorded by its outcome alone, without a "
        "processing record first (one Kafka write fewer a job; a poll meanwhile reads pending). Only "
        "for requests no worker can have taken before; 0 records processing before every call."
    )
    http_max_connections: int = Field(
        4096, ge=1, description="Provider connections one worker process holds at most (all providers)."
    )
    http_connect_timeout_seconds: float = Field(10.0, gt=0, description="Provider connect timeout.")
    provider_timeout_seconds: float = Field(
        600.0, gt=0, description="Default whole-call timeout of a provider request."
    )
    retry_max_attempts: int = Field(
        4, ge=1, description="Calls per target (provider/model) before moving to the next fallback."
    )
    retry_initial_backoff_seconds: float = Field(0.5, ge=0, description="First retry delay.")
    retry_max_backoff_seconds: float = Field(
        60.0, ge=0, description="Cap on a retry delay, Retry-After included."
    )
    job_deadline_seconds: float = Field(
        1800.0, gt=0, description="Longest a job may run in one worker, from its first call: no call or "
        "retry wait goes past it (each call's timeout is cut to what is left); then the job fails with 504. "
        "The default is three default-length (600 s) calls."
    )
    job_max_attempts: int = Field(
        3, ge=1, description="Workers that may start a job before it is failed as poison "
        "(each crash or lost worker mid-call counts, but one within worker_processing_record_after_seconds "
        "of a new request's first call) and copied to the dead-letter topic."
    )
    worker_shutdown_grace_seconds: float = Field(
        25.0, ge=0, description="On SIGTERM, how long in-flight calls may finish before the worker leaves."
    )
    kafka_session_timeout_seconds: float = Field(
        10.0, gt=0, description="How long a silent worker keeps its partitions before the group "
        "reassigns them (bounds crash recovery)."
    )

    # -- Providers --------------------------------------------------------------------------------
    providers: dict[str, ProviderConfig] = Field(
        default_factory=dict,
        description="Per-provider overrides and custom providers, JSON: "
        '{"vllm": {"base_url": "http://gpu:8000/v1"}, "openai": {"api_key_env": "MY_KEY"}}.',
    )

    _endpoints: dict[str, ProviderEndpoint] = PrivateAttr(default_factory=dict)

    def model_post_init(self, context: Any) -> None:
        self._endpoints = _resolve_endpoints(self.providers, self.provider_timeout_seconds)

    @property
    def provider_endpoints(self) -> dict[str, ProviderEndpoint]:
        """Every usable provider by name: base URL and key resolved, disabled ones left out."""
        return self._endpoints

    log_level: str = Field("INFO", description="Log level of the API and worker processes.")
    log_format: Literal["text", "json"] = Field(
        "text", description="text: one readable line per record; json: one JSON object per line (time, "
        "level, logger, message, and job_id, request_type, provider when the record has them)."
    )

    def require_bootstrap_servers(self) -> str:
        """The broker address, or a clear error for a process that cannot run without one."""
        if not self.kafka_bootstrap_servers:
            raise SystemExit(
                "KAFKA_BOOTSTRAP_SERVERS is not set; `make run` sets it for you, "
                "or point it at your brokers (host:port[,host:port...])"
            )
        return self.kafka_bootstrap_servers


def _resolve_endpoints(configs: dict[str, ProviderConfig], default_timeout: float) -> dict[str, ProviderEndpoint]:
    """Merge the catalogue's defaults with the configuration; keep the usable providers.

    A provider is usable when it has a base URL and, if it needs one, a key: from its
    configuration, or from the environment variable its configuration or the catalogue names.
    """
    endpoints: dict[str, ProviderEndpoint] = {}
    for name in {*CATALOGUE, *configs}:
        spec = CATALOGUE.get(name)
        config = configs.get(name, ProviderConfig())
        if not config.enabled:
            continue
        if spec and not spec.needs_key and name not in configs:
            continue  # a self-hosted server is used only where it is configured
        base_url = config.base_url or (spec.default_base_url if spec else None)
        key_env = config.api_key_env or (spec.api_key_env if spec else None)
        key = config.api_key.get_secret_value() if config.api_key else (os.environ.get(key_env) if key_env else None)
        needs_key = spec.needs_key if spec else False
        if not base_url or (needs_key and not key):
            continue
        endpoints[name] = ProviderEndpoint(
            name=name,
            family=spec.family if spec else CUSTOM_FAMILY,
            base_url=base_url.rstrip("/"),
            api_key=key or None,
            timeout_seconds=config.timeout_seconds or default_timeout,
            max_concurrency=config.max_concurrency,
            requests_per_minute=config.requests_per_minute,
            request_types=frozenset(config.request_types) if config.request_types is not None
            else spec.request_types if spec else CUSTOM_TYPES,
            api_version=config.api_version,
        )
    return endpoints
