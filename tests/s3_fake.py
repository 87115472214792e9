"""A real S3-compatible HTTP server for tests: moto's server mode in a subprocess on 127.0.0.1.

IAM is enforced (moto's `/moto-api/reset-auth`): every request must be signed by a known access key
whose policy allows the action, so AccessDenied is the server's own answer, not a mock's. `admin` may do
anything; `reader_credentials(bucket)` makes a user that may only read one bucket.

The moto listing of a prefix containing '/' fails its own signature check when auth is on (moto 5.2),
which the shard never needs: it reads the two PEFT files by key.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REGION = "us-east-1"
_SERVER = (  # exits when the test process that started it is gone, however it ended
    "import os, sys, time\n"
    "from moto.server import ThreadedMotoServer\n"
    "parent = os.getppid()\n"
    "ThreadedMotoServer(ip_address='127.0.0.1', port=int(sys.argv[1]), verbose=False).start()\n"
    "while os.getppid() == parent: time.sleep(1)\n"
    "os._exit(0)\n"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeS3:
    def __init__(self):
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SERVER, str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        try:
            self._wait_and_enforce_iam()
        except BaseException:
            self.stop()
            raise

    def _wait_and_enforce_iam(self) -> None:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2).read()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.1)
        self.admin = self._user("admin", [{"Effect": "Allow", "Action": "*", "Resource": "*"}], no_auth=True)
        # From now on every request is authenticated and authorized against IAM.
        enforce = urllib.request.Request(f"{self.endpoint}/moto-api/reset-auth", data=b"0",
                                         headers={"Content-Type": "text/plain"})  # fmt: skip
        urllib.request.urlopen(enforce, timeout=10).read()

    def _user(self, name: str, statements: list[dict], no_auth: bool = False) -> dict[str, str]:
        anyone = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
        creds = anyone if no_auth else self.admin
        iam = self.client("iam", creds)
        iam.create_user(UserName=name)
        policy = {"Version": "2012-10-17", "Statement": statements}
        iam.put_user_policy(UserName=name, PolicyName="p", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return {"aws_access_key_id": key["AccessKeyId"], "aws_secret_access_key": key["SecretAccessKey"]}

    def reader_credentials(self, bucket: str, name: str) -> dict[str, str]:
        """A user allowed s3:GetObject / s3:ListBucket on `bucket` only."""
        allow = {"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"],
                 "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]}  # fmt: skip
        return self._user(name, [allow])

    def client(self, service: str = "s3", creds: dict[str, str] | None = None):
        import boto3

        return boto3.client(service, endpoint_url=self.endpoint, region_name=REGION, **(creds or self.admin))

    def env(self, creds: dict[str, str]) -> dict[str, str]:
        """What a shard process needs to reach this server with `creds` (boto3's standard variables)."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_REGION": REGION,
                "AWS_ACCESS_KEY_ID": creds["aws_access_key_id"],
                "AWS_SECRET_ACCESS_KEY": creds["aws_secret_access_key"]}  # fmt: skip

    def bucket(self, name: str) -> str:
        s3 = self.client()
        if name not in {b["Name"] for b in s3.list_buckets()["Buckets"]}:
            s3.create_bucket(Bucket=name)
        return name

    def upload(self, local_dir: Path, bucket: str, prefix: str, files=None) -> str:
        """Every file of `local_dir` (or just `files`) under s3://bucket/prefix/; -> the adapter id."""
        s3 = self.client()
        for f in sorted(Path(local_dir).iterdir()):
            if f.is_file() and (files is None or f.name in files):
                s3.put_object(Bucket=bucket, Key=f"{prefix}/{f.name}", Body=f.read_bytes())
        return f"s3://{bucket}/{prefix}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
