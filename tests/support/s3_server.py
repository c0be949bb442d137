"""A real S3 emulator of a test's own (moto's server mode, on a loopback port), with a bucket."""

from __future__ import annotations

import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.servers import free_port
from tests.support.waiting import wait_for


@dataclass
class S3Server:
    work_dir: Path
    port: int = field(default_factory=free_port)
    bucket: str = field(default_factory=lambda: f"runctx-{uuid.uuid4().hex[:10]}")
    process: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        """boto3's settings for it (what a deployment sets for its own store)."""
        return {
            "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{self.port}", "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1",
        }

    def url(self, prefix: str = "blobs") -> str:
        return f"s3://{self.bucket}/{prefix}"

    def client(self):
        import boto3

        env = self.env
        return boto3.client(
            "s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"], aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1"
        )

    def start(self) -> S3Server:
        log = open(self.work_dir / "moto.log", "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        log.close()

        def up() -> bool:
            try:
                self.client().create_bucket(Bucket=self.bucket)
                return True
            except Exception:  # not listening yet
                if self.process is not None and self.process.poll() is not None:
                    raise RuntimeError(f"moto server exited: see {self.work_dir / 'moto.log'}") from None
                return False

        wait_for(up, 30, "the S3 emulator to answer", 0.1)
        return self

    def objects(self) -> dict[str, bytes]:
        client = self.client()
        listed = client.list_objects_v2(Bucket=self.bucket).get("Contents", [])
        return {item["Key"]: client.get_object(Bucket=self.bucket, Key=item["Key"])["Body"].read() for item in listed}

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
