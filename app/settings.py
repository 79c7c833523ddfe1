"""Ferry's configuration: one frozen pydantic-settings class, read from the environment once.

Every variable is ``FERRY_<FIELD>`` in upper case (``FERRY_API_PORT``), except the broker
address, which also answers to the conventional ``KAFKA_BOOTSTRAP_SERVERS``. The README lists
them all. Nothing else in Ferry reads the environment: processes build one ``Settings`` at
start-up and pass it down.
"""

from __future__ import annotations

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="FERRY_", frozen=True, extra="ignore", populate_by_name=True
    )

    # -- Kafka ------------------------------------------------------------------------------
    kafka_bootstrap_servers: str | None = Field(
        default=None,
        validation_alias=AliasChoices("KAFKA_BOOTSTRAP_SERVERS", "FERRY_KAFKA_BOOTSTRAP_SERVERS"),
        description="Comma-separated host:port list. Unset: `make run` and the tests find or "
        "start a broker (deploy/kafka/locate.py); the API and worker refuse to start.",
    )
    local_kafka_port: int = Field(19092, description="Port of the local development broker.")
    app_id: str = Field("ferry", description="Faust app id: consumer group and changelog names.")
    topic_prefix: str = Field("ferry", description="Prefix of every request topic name.")
    topic_partitions: int = Field(
        8, ge=1, description="Partitions of every request topic and of the jobs table."
    )
    topic_replication_factor: int = Field(
        1, ge=1, description="Replicas of every topic Ferry declares (production: 3)."
    )

    # -- API ----------------------------------------------------------------------------------
    api_host: str = Field("127.0.0.1", description="Address the API listens on.")
    api_port: int = Field(8080, description="Port the API listens on.")

    # -- Worker ---------------------------------------------------------------------------------
    worker_web_port: int = Field(6066, description="Port of the worker's health endpoint.")

    log_level: str = Field("INFO", description="Log level of the API and worker processes.")

    def require_bootstrap_servers(self) -> str:
        """The broker address, or a clear error for a process that cannot run without one."""
        if not self.kafka_bootstrap_servers:
            raise SystemExit(
                "KAFKA_BOOTSTRAP_SERVERS is not set; `make run` sets it for you, "
                "or point it at your brokers (host:port[,host:port...])"
            )
        return self.kafka_bootstrap_servers
