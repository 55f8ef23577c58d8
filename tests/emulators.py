"""Local object-store servers for tests, benchmarks and trying batchscore without a cloud.

    python tests/emulators.py          # starts both on 127.0.0.1, prints `export ...` lines

`gcp-storage-emulator` serves gs:// (through gcsfs) and moto serves s3:// (through s3fs). Each
runs as a child process on a free loopback port and is stopped by its PID. The environment
they need is the one users set for their own clients: STORAGE_EMULATOR_HOST for GCS,
AWS_ENDPOINT_URL (+ dummy credentials) for S3. Both are test dependencies
(`pip install -e ".[test]"`).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Server:
    name: str
    proc: subprocess.Popen
    port: int
    env: dict[str, str]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_gcs(log: Path | None = None) -> Server:
    port = free_port()
    proc = _start([_bin("gcp-storage-emulator"), "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory",
                   "-q"], port, log)
    return Server("gcs", proc, port, {
        "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}",
        # gcsfs >= 2026 stalls a minute per call against emulators in this experimental mode.
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    })


def start_s3(log: Path | None = None) -> Server:
    port = free_port()
    proc = _start([_bin("moto_server"), "-H", "127.0.0.1", "-p", str(port)], port, log)
    return Server("s3", proc, port, {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",  # not client_kwargs: that breaks bucket creation on moto
    })


def _bin(name: str) -> str:
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise FileNotFoundError(f"{name} not found next to {sys.executable}; install the test extras: "
                                'pip install -e ".[test]"')
    return str(path)


def _start(args: list[str], port: int, log: Path | None) -> subprocess.Popen:
    out = open(log, "wb") if log else subprocess.DEVNULL
    proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            detail = log.read_text()[-2000:] if log else ""
            raise RuntimeError(f"{Path(args[0]).name} exited with {proc.returncode} {detail}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{Path(args[0]).name} did not listen on 127.0.0.1:{port} within 60 s")


def main() -> None:
    servers = [start_gcs(), start_s3()]
    for server in servers:
        for key, value in server.env.items():
            print(f"export {key}={value}")
    print(f"# running (PIDs {', '.join(str(s.proc.pid) for s in servers)}); Ctrl-C stops both", flush=True)
    try:
        while all(s.proc.poll() is None for s in servers):
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        for server in servers:
            server.stop()


if __name__ == "__main__":
    main()
