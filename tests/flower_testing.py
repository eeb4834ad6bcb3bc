"""Helpers of the Flower deployment tests: a test CA, SuperNode keys, free ports, and processes
started in their own sessions that are always stopped."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

REPO = Path(__file__).resolve().parents[1]
FLOWER_APP = REPO / "src" / "fedssd" / "configs" / "flower_app"
"""The Flower App of the repository (what `fedssd flower-app DIR` writes)."""
BIN = Path(sys.executable).parent


def flower_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        FLWR_DISABLE_UPDATE_CHECK="1",
        RAY_USAGE_STATS_ENABLED="0",
    )
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def write_tls(folder: Path) -> None:
    """A test CA and a server certificate for 127.0.0.1 signed by it (as the openssl commands in
    docs/flower.md make them)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedssd test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (folder / "ca.crt").write_bytes(ca.public_bytes(pem))
    (folder / "server.pem").write_bytes(cert.public_bytes(pem))
    (folder / "server.key").write_bytes(
        key.private_bytes(
            pem, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        )
    )


def write_node_key(path: Path) -> None:
    """An ECDSA P-384 key pair in OpenSSH format (as ``ssh-keygen -t ecdsa -b 384`` writes)."""
    key = ec.generate_private_key(ec.SECP384R1())
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    path.with_suffix(".pub").write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    )


class Processes:
    """Processes started in their own sessions, all stopped (TERM, then KILL) on close."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("wb")
        process = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log.close()
        self.started.append((name, process))
        return process

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def close(self) -> None:
        for _, process in self.started:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for _, process in self.started:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
            # Children that outlived their parent (the ServerApp / ClientApp runners).
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the SuperLink exited while starting"
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"nothing listens on port {port} after {timeout}s")


def flwr_home(folder: Path) -> tuple[Path, int]:
    """``FLWR_HOME`` (``folder/flwr-home``) naming a federation ``test`` on a free port of
    127.0.0.1 that trusts the CA of :func:`write_tls`; returns it and the port."""
    home = folder / "flwr-home"
    home.mkdir()
    port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{folder / "ca.crt"}"\n'
    )
    return home, port


def start_superlink(
    processes: Processes,
    folder: Path,
    port: int,
    env: dict[str, str],
    *,
    register: list[str],
    cli_env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """A SuperLink on ``port`` with TLS (:func:`write_tls`'s files in ``folder``) and SuperNode
    authentication, once it listens, with the public keys ``folder/<name>.pub`` registered."""
    superlink = processes.start(
        "superlink",
        [
            str(BIN / "flower-superlink"),
            "--ssl-ca-certfile", str(folder / "ca.crt"),
            "--ssl-certfile", str(folder / "server.pem"),
            "--ssl-keyfile", str(folder / "server.key"),
            "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
            "--host", "127.0.0.1",
            "--port", str(port),
        ],
        env,
    )  # fmt: skip
    wait_for_port(port, superlink, timeout=60)
    for name in register:
        registered = subprocess.run(
            [str(BIN / "flwr"), "supernode", "register", str(folder / f"{name}.pub"), "test"],
            env=cli_env or env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert registered.returncode == 0, registered.stdout + registered.stderr
    return superlink
