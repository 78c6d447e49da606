"""An S3-compatible server for the tests: moto's server mode (``ThreadedMotoServer``), real HTTP on loopback."""

from __future__ import annotations

import uuid
from typing import Any

from .ports import free_port, wait_for_port

ACCESS_KEY = "testing"
SECRET_KEY = "testing-secret"
REGION = "us-east-1"


class MotoS3:
    """Start with :meth:`start` (or as a context manager); :meth:`bucket` creates a fresh bucket."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server: Any = None

    def start(self) -> MotoS3:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request (CPU in benchmarks)

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        wait_for_port(self.port, timeout=30)
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def __enter__(self) -> MotoS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.url, region_name=REGION, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY)

    def bucket(self, name: str | None = None) -> str:
        name = name or f"openpacs-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def settings(self) -> dict[str, object]:
        """The server settings that point OpenPACS at this server."""
        return {"s3_endpoint_url": self.url, "s3_region": REGION, "s3_access_key": ACCESS_KEY,
                "s3_secret_key": SECRET_KEY}
