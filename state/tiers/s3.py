"""Blobs in an S3-compatible object store (RUNCTX_BLOB_URL=s3://bucket/prefix), by boto3: the
endpoint, region and credentials are boto3's own settings (AWS_ENDPOINT_URL_S3, AWS_REGION,
AWS_ACCESS_KEY_ID, ... or a profile), so MinIO, Ceph and the like are named the way boto3 names them."""

from __future__ import annotations

import datetime as dt
import os
from typing import Any
from urllib.parse import urlparse

from state.errors import CommunicationFailure, SettingsError

BLOB_URL_SETTING = "RUNCTX_BLOB_URL"


class S3Objects:
    """One bucket and key prefix (`ObjectStore`). Owns a boto3 client per process (made on first
    use: a client does not survive a fork); promises that a stored key is never uploaded again."""

    def __init__(self, url: str) -> None:
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise SettingsError(BLOB_URL_SETTING, f"{url!r}: expected s3://bucket/prefix")
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self._client: Any = None
        self._pid = 0

    def _s3(self) -> Any:
        if self._client is None or self._pid != os.getpid():
            try:
                import boto3
            except ImportError:
                raise SettingsError(BLOB_URL_SETTING, "an s3:// URL needs boto3: pip install 'runctx[s3]'") from None
            self._client, self._pid = boto3.client("s3"), os.getpid()
        return self._client

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, what: str, call: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return call()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise CommunicationFailure(f"object store ({what})", exc) from None
        except BotoCoreError as exc:
            raise CommunicationFailure(f"object store ({what})", exc) from None

    def put_object(self, key: str, data: bytes, *, replace: bool = False) -> None:
        s3, name = self._s3(), self._key(key)
        if replace or self._call("head", lambda: s3.head_object(Bucket=self.bucket, Key=name)) is None:
            self._call("put", lambda: s3.put_object(Bucket=self.bucket, Key=name, Body=data))

    def get_object(self, key: str) -> bytes | None:
        s3 = self._s3()
        found = self._call("get", lambda: s3.get_object(Bucket=self.bucket, Key=self._key(key)))
        return None if found is None else found["Body"].read()

    def delete_objects(self, keys: list[str]) -> None:
        s3 = self._s3()
        for start in range(0, len(keys), 1000):
            batch = [{"Key": self._key(key)} for key in keys[start : start + 1000]]
            self._call("delete", lambda batch=batch: s3.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}))

    def object_keys(self, *, older_than_s: float) -> list[str]:
        cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=older_than_s)
        pages = self._s3().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=f"{self.prefix}/" if self.prefix else "")
        found = []
        for page in self._call("list", lambda: list(pages)) or []:
            for item in page.get("Contents", []):
                if item["LastModified"] < cutoff:
                    found.append(item["Key"][len(self.prefix) + 1 :] if self.prefix else item["Key"])
        return found
