"""An S3-compatible server on 127.0.0.1 for tests and benchmarks: moto in server mode, in its own process.

    with s3_server() as endpoint:    # AWS_ENDPOINT_URL and test credentials are set in os.environ
        ...                          # s3fs, boto3 and every child process reach it as s3://

Needs moto[server], boto3 and s3fs (the dev extra installs them); callers skip without them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager

ENV = {
    "AWS_ACCESS_KEY_ID": "histotx-test",
    "AWS_SECRET_ACCESS_KEY": "histotx-test",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def missing() -> str | None:
    for module in ("moto", "boto3", "s3fs", "flask"):
        try:
            __import__(module)
        except ImportError:
            return f"object-storage tests need {module} (pip install 'histotx[dev]': moto[server], boto3, s3fs)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def s3_server():
    """Start `python -m moto.server` on a free port of 127.0.0.1; point S3 clients at it (environment)."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    saved = {k: os.environ.get(k) for k in [*ENV, "AWS_ENDPOINT_URL"]}
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start: {proc.stderr.read().decode()[-2000:]}") from None
                time.sleep(0.2)
        os.environ.update(ENV, AWS_ENDPOINT_URL=endpoint)
        yield endpoint
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def client():
    import boto3

    return boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
