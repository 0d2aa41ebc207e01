"""A real S3-compatible server (moto's server mode) on 127.0.0.1 for the download tests."""

from __future__ import annotations

import socket
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalS3:
    def __init__(self):
        from moto.server import ThreadedMotoServer

        self.port = free_port()
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def start(self) -> "LocalS3":
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test")

    def public_bucket(self, bucket: str) -> None:
        """Like the CellMap bucket: anyone may list and read, without credentials."""
        import json

        client = self.client()
        client.create_bucket(Bucket=bucket, ACL="public-read")
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Principal": "*", "Action": ["s3:GetObject", "s3:ListBucket"], "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]}],
        }
        client.put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))

    def upload_tree(self, bucket: str, root: Path, prefix: str) -> int:
        client = self.client()
        count = 0
        for path in sorted(root.rglob("*")):
            if path.is_file():
                client.put_object(Bucket=bucket, Key=f"{prefix}/{path.relative_to(root).as_posix()}", Body=path.read_bytes(), ACL="public-read")
                count += 1
        return count
