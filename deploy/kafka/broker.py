"""A real single-node Apache Kafka broker (KRaft) on loopback, for development, tests and CI.

The broker is Apache Kafka's own jars from Maven Central, fetched once with Maven into
``.local/kafka/libs`` (the pom beside this file pins the version) and reused afterwards. One node
plays both KRaft roles, broker and controller; ``cluster.py`` runs three such nodes as one
cluster. State lives under ``<home>``:

    libs/             the jar cache, shared by all homes (a marker records a complete download)
    data/             KRaft metadata and topic logs (formatted once, kept across restarts)
    logs/server.log   the broker's own log (rolls to server.log.1 at 100 MB)
    server.properties generated on every start from the port settings
    broker.pid        the running broker's pid

``start()`` is idempotent: a live broker that this home started is reused, and a crashed one's
leftovers (a stale pid file, a half-formatted data dir) don't block the next start.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent
DEFAULT_HOME = REPO_ROOT / ".local" / "kafka"
DEFAULT_PORT = 19092
STARTED_MARKER = "Kafka Server started"


class BrokerError(RuntimeError):
    """The local broker could not be fetched, started or stopped."""


def _kafka_version() -> str:
    pom = (HERE / "pom.xml").read_text()
    start = pom.index("<kafka.version>") + len("<kafka.version>")
    return pom[start : pom.index("</kafka.version>")]


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); /proc tells it apart from a live process.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


def _runs_properties(pid: int, properties: Path) -> bool:
    """Whether ``pid`` is a broker started with ``properties``, under whichever path named it: a
    second checkout whose ``.local`` links to the first's reaches the same broker by another path."""
    try:
        arguments = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        wanted = properties.resolve()
        return any(Path(os.fsdecode(argument)).resolve() == wanted
                   for argument in arguments if argument.endswith(b".properties"))
    except OSError:
        return False


def _kafka_uuid() -> str:
    """A cluster id in Kafka's own form: 16 random bytes, URL-safe base64, no padding.

    Never starting with "-" (as Kafka's own Uuid.randomUuid ensures): the storage tool's
    argument parser would read such an id as an option (1 format in 64 failed that way)."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):
            return cluster_id


@dataclass
class LocalKafka:
    """One local broker, identified by its home directory and port."""

    home: Path = DEFAULT_HOME
    port: int = DEFAULT_PORT
    controller_port: int | None = None
    heap: str = "1g"
    # Shared by every home on the machine, so a second broker (tests start one) downloads nothing.
    jar_cache: Path = DEFAULT_HOME / "libs"
    # An optional second client listener, SASL over TLS (the secured clients' test): its port, a
    # PEM file with the server's private key (PKCS#8, unencrypted) and certificate chain, a PEM
    # file of CAs whose client certificates it requires (mutual TLS; None: none asked for), the
    # mechanisms it enables, and the users (name: password) given SCRAM credentials at format
    # time. Inter-broker and controller traffic stay PLAINTEXT on loopback.
    sasl_ssl_port: int | None = None
    ssl_keystore_pem: Path | None = None
    ssl_client_truststore_pem: Path | None = None
    sasl_mechanisms: tuple[str, ...] = ("SCRAM-SHA-512",)
    sasl_users: dict[str, str] | None = None
    # Membership of a cluster (cluster.py); the defaults make a cluster of this node alone. voters:
    # every controller's node id and controller port (empty: this node's); cluster_id: the id to format
    # storage with (None: a fresh one); replicas and min_insync_replicas: every topic's defaults,
    # internal ones too.
    node_id: int = 1
    voters: dict[int, int] = field(default_factory=dict)
    cluster_id: str | None = None
    replicas: int = 1
    min_insync_replicas: int = 1

    def __post_init__(self) -> None:
        # Absolute: the broker runs with the home as its working directory.
        self.home = Path(self.home).absolute()
        self.jar_cache = Path(self.jar_cache).absolute()
        if self.controller_port is None:
            self.controller_port = self.port + 1
        if not self.voters:
            self.voters = {self.node_id: self.controller_port}

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _ports_taken(self) -> bool:
        """Whether something accepts connections on the client or the controller port."""
        return any(_port_open(port) for port in (self.port, self.controller_port) if port is not None)

    @property
    def libs(self) -> Path:
        return self.jar_cache

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def log_dir(self) -> Path:
        return self.home / "logs"

    @property
    def pid_file(self) -> Path:
        return self.home / "broker.pid"

    @property
    def started_file(self) -> Path:
        """The pid of the last broker seen started: its log may since have rolled over (100 MB,
        one old file kept) and no longer hold the start marker."""
        return self.home / "broker.started"

    @property
    def properties_file(self) -> Path:
        return self.home / "server.properties"

    # -- jars ---------------------------------------------------------------------------

    def ensure_jars(self) -> None:
        """Fetch the broker jars with Maven, unless a complete download is already cached."""
        version = _kafka_version()
        marker = self.libs / f".complete-{version}"
        if marker.exists():
            return
        if shutil.which("mvn") is None:
            raise BrokerError("Maven (mvn) is needed to fetch the Kafka jars; install it")
        staging = self.libs.with_name(self.libs.name + ".partial")
        staging.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        cmd = [
            "mvn", "-q", "-B", "-f", str(HERE / "pom.xml"),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={staging}", "-DincludeScope=runtime",
        ]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise BrokerError(f"fetching Kafka {version} jars failed:\n{result.stdout}{result.stderr}")
        # Swap in whole, so an interrupted download never looks complete.
        shutil.rmtree(self.libs, ignore_errors=True)
        staging.rename(self.libs)
        (self.libs / f".complete-{version}").touch()

    # -- state ----------------------------------------------------------------------------

    def _read_pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def running_pid(self) -> int | None:
        """The pid of this home's live broker, or None (clearing a stale pid file)."""
        pid = self._read_pid()
        if pid is None:
            return None
        if _pid_alive(pid) and _runs_properties(pid, self.properties_file):
            return pid
        self.pid_file.unlink(missing_ok=True)
        return None

    def running_port(self) -> int | None:
        """The client port this home's broker was last started with (from its properties file)."""
        try:
            lines = self.properties_file.read_text().splitlines()
        except OSError:
            return None
        for line in lines:
            if line.startswith("advertised.listeners=PLAINTEXT://"):
                return int(line.split(",")[0].rsplit(":", 1)[1])
        return None

    def _write_properties(self) -> None:
        replicas, min_isr = str(self.replicas), str(self.min_insync_replicas)
        settings = {
            "process.roles": "broker,controller",
            "node.id": str(self.node_id),
            "controller.quorum.voters": ",".join(f"{node}@127.0.0.1:{port}" for node, port in self.voters.items()),
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.data_dir),
            # Topics are declared by the app, with their own partition counts and policies.
            "auto.create.topics.enable": "false",
            "num.partitions": "1",
            "default.replication.factor": replicas,
            "min.insync.replicas": min_isr,
            # Internal topics as replicated as the rest (one replica on a single node).
            "offsets.topic.replication.factor": replicas,
            "offsets.topic.num.partitions": "10",
            "transaction.state.log.replication.factor": replicas,
            "transaction.state.log.min.isr": min_isr,
            "share.coordinator.state.topic.replication.factor": replicas,
            "share.coordinator.state.topic.min.isr": min_isr,
            # A node that stops heartbeating is fenced after 3 s (Kafka's default is 9 s) and leaves
            # every in-sync replica set, so acks=all writes go on without it: Ferry's submit
            # timeout is above this. Heartbeats every 0.5 s keep a busy node from a false fencing.
            "broker.session.timeout.ms": "3000",
            "broker.heartbeat.interval.ms": "500",
            # Consumers join at once instead of waiting 3 s for more members.
            "group.initial.rebalance.delay.ms": "0",
            # Compaction and tombstone removal are visible within seconds, not hours.
            "log.cleaner.backoff.ms": "1000",
            "log.segment.bytes": str(64 * 1024 * 1024),
        }
        if self.sasl_ssl_port is not None:
            settings.update(self._sasl_ssl_properties(settings))
        text = "".join(f"{key}={value}\n" for key, value in settings.items())
        self.properties_file.write_text(text)

    def _sasl_ssl_properties(self, base: dict[str, str]) -> dict[str, str]:
        """The SASL_SSL listener's properties, added to ``base``'s listeners."""
        if self.ssl_keystore_pem is None:
            raise BrokerError("a SASL_SSL listener needs ssl_keystore_pem (the server's key and certificate)")
        address = f"SASL_SSL://127.0.0.1:{self.sasl_ssl_port}"
        prefix = "listener.name.sasl_ssl."
        properties = {
            "listeners": f"{base['listeners']},{address}",
            "advertised.listeners": f"{base['advertised.listeners']},{address}",
            "listener.security.protocol.map": f"{base['listener.security.protocol.map']},SASL_SSL:SASL_SSL",
            "sasl.enabled.mechanisms": ",".join(self.sasl_mechanisms),
            f"{prefix}ssl.keystore.type": "PEM",
            f"{prefix}ssl.keystore.location": str(self.ssl_keystore_pem),
            f"{prefix}ssl.client.auth": "required" if self.ssl_client_truststore_pem else "none",
        }
        if self.ssl_client_truststore_pem is not None:
            properties[f"{prefix}ssl.truststore.type"] = "PEM"
            properties[f"{prefix}ssl.truststore.location"] = str(self.ssl_client_truststore_pem)
        for mechanism in self.sasl_mechanisms:
            if mechanism.startswith("SCRAM-"):
                module = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
            elif mechanism == "PLAIN":
                users = " ".join(f'user_{name}="{password}"' for name, password in (self.sasl_users or {}).items())
                module = f"org.apache.kafka.common.security.plain.PlainLoginModule required {users};"
            else:
                raise BrokerError(f"the local broker does not set up SASL mechanism {mechanism}")
            properties[f"{prefix}{mechanism.lower()}.sasl.jaas.config"] = module
        return properties

    def _format_storage(self) -> None:
        if (self.data_dir / "meta.properties").exists():
            return
        # A data dir without meta.properties is a format that never finished: start over.
        shutil.rmtree(self.data_dir, ignore_errors=True)
        cmd = [
            "java", "-cp", f"{self.libs}/*", f"-Dlog4j2.configurationFile={HERE / 'log4j2.properties'}",
            f"-Dkafka.logs.dir={self.log_dir}",
            "kafka.tools.StorageTool", "format",
            "-t", self.cluster_id or _kafka_uuid(), "-c", str(self.properties_file),
        ]
        # SCRAM credentials live in the KRaft metadata: the storage tool writes them at format time.
        if self.sasl_ssl_port is not None:
            for mechanism in (m for m in self.sasl_mechanisms if m.startswith("SCRAM-")):
                for name, password in (self.sasl_users or {}).items():
                    cmd += ["--add-scram", f"{mechanism}=[name={name},password={password}]"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise BrokerError(f"formatting KRaft storage failed:\n{result.stdout}{result.stderr}")

    # -- lifecycle ------------------------------------------------------------------------

    def start(self, timeout: float = 90.0) -> str:
        """Start the broker unless it already runs; return its bootstrap address once it serves."""
        if self.running_pid() is not None:
            self._wait_ready(timeout)
            return self.bootstrap_servers
        if self._ports_taken():
            raise BrokerError(
                f"port {self.port} or {self.controller_port} is taken by a process this broker "
                f"home ({self.home}) did not start; stop it or choose another port"
            )
        self.home.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(exist_ok=True)
        self.ensure_jars()
        self._write_properties()
        self._format_storage()
        log_offset = self._server_log().stat().st_size if self._server_log().exists() else 0
        cmd = [
            "java", "-Xms256m", f"-Xmx{self.heap}", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={HERE / 'log4j2.properties'}",
            f"-Dkafka.logs.dir={self.log_dir}",
            "-cp", f"{self.libs}/*", "kafka.Kafka", str(self.properties_file),
        ]
        with open(self.log_dir / "stdout.log", "ab") as out:
            # A session of its own: the broker outlives the command that started it, and
            # Ctrl-C in a terminal reaches it only through stop().
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.home, start_new_session=True,
            )
        self.pid_file.write_text(str(proc.pid))
        self._wait_ready(timeout, proc=proc, log_offset=log_offset)
        return self.bootstrap_servers

    def _server_log(self) -> Path:
        return self.log_dir / "server.log"

    def _wait_ready(self, timeout: float, proc: subprocess.Popen | None = None, log_offset: int = 0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                self.pid_file.unlink(missing_ok=True)
                raise BrokerError(f"the broker exited with {proc.returncode}; see {self.log_dir}")
            if (self._seen_started() or self._started_since(log_offset)) and _port_open(self.port):
                self.started_file.write_text(str(self._read_pid()))
                return
            time.sleep(0.2)
        raise BrokerError(f"the broker did not start within {timeout:.0f} s; see {self.log_dir}")

    def _seen_started(self) -> bool:
        pid = self._read_pid()
        try:
            return pid is not None and int(self.started_file.read_text().strip()) == pid
        except (OSError, ValueError):
            return False

    def _started_since(self, offset: int) -> bool:
        try:
            with open(self._server_log(), "rb") as log:
                if os.fstat(log.fileno()).st_size < offset:
                    offset = 0  # the log rolled over (at its size cap) since this start began
                log.seek(offset)
                return STARTED_MARKER.encode() in log.read()
        except OSError:
            return False

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop the broker if it runs (SIGTERM, then SIGKILL after ``timeout``); True if it ran."""
        pid = self.running_pid()
        if pid is None:
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
            while _pid_alive(pid):
                time.sleep(0.05)
        self._wait_ports_closed()
        self.pid_file.unlink(missing_ok=True)
        self.started_file.unlink(missing_ok=True)
        return True

    def _wait_ports_closed(self, timeout: float = 15.0) -> None:
        # A multi-threaded JVM's main thread can be a zombie while other threads still hold
        # its sockets; the broker is gone only when its ports are.
        deadline = time.monotonic() + timeout
        while self._ports_taken() and time.monotonic() < deadline:
            time.sleep(0.05)

    def kill(self) -> bool:
        """SIGKILL the broker, as a crash would: for tests of recovery from broker loss."""
        pid = self.running_pid()
        if pid is None:
            return False
        os.kill(pid, signal.SIGKILL)
        while _pid_alive(pid):
            time.sleep(0.05)
        self._wait_ports_closed()
        return True
