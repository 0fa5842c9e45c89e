"""An S3 bucket as an object store (boto3): AWS, Ceph RGW, Swift with s3api, any S3 API.

Credentials come from boto3's usual chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY,
AWS_PROFILE and ~/.aws); the region from AWS_DEFAULT_REGION (default us-east-1). Addresses
are path-style, which every S3 server understands. Every PUT carries Content-MD5, so a body
damaged on the way is refused by the server instead of stored. botocore's own retries are
off: the retry loop is ObjectStore's, the same for every backend.
"""

import base64
import hashlib

from chunkvol.errors import ChunkvolError, NotFoundError
from chunkvol.objstore.store import ObjectStore, TransientError, denied, missing

CONNECT_TIMEOUT = 5
READ_TIMEOUT = 30
DENIED_CODES = frozenset(("AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId", "403",
                          "InvalidToken", "ExpiredToken", "AllAccessDisabled"))
MISSING_CODES = frozenset(("NoSuchKey", "404", "NotFound"))
TRANSIENT_CODES = frozenset(("SlowDown", "RequestTimeout", "Throttling", "BadDigest", "IncompleteBody"))


class S3Store(ObjectStore):
    def __init__(self, url, endpoint, bucket):
        import boto3
        import botocore.config
        import botocore.exceptions
        self.url = url
        self.bucket = bucket
        self._botocore = botocore.exceptions
        config = botocore.config.Config(s3={"addressing_style": "path"}, connect_timeout=CONNECT_TIMEOUT,
                                        read_timeout=READ_TIMEOUT, retries={"total_max_attempts": 1})
        session = boto3.session.Session()
        self.client = session.client("s3", endpoint_url=endpoint, config=config,
                                     region_name=session.region_name or "us-east-1")

    def _call(self, what, name, method, **arguments):
        exceptions = self._botocore
        try:
            return method(Bucket=self.bucket, **arguments)
        except exceptions.NoCredentialsError:
            raise denied(self.url, what, "no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                                         "or AWS_PROFILE") from None
        except exceptions.ClientError as error:
            code = error.response.get("Error", {}).get("Code", "")
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if code in DENIED_CODES:
                raise denied(self.url, what, code) from None
            if code == "NoSuchBucket":
                raise NotFoundError(f"{self.url}: no bucket {self.bucket}") from None
            if code in MISSING_CODES:
                raise missing(self.url, name) from None
            if status >= 500 or status in (0, 429) or code in TRANSIENT_CODES:
                raise TransientError(f"{code or status}") from None
            raise ChunkvolError(f"{self.url}: {what} {name}: refused by the store ({code or status})") from None
        except (exceptions.EndpointConnectionError, exceptions.ConnectionError, exceptions.ReadTimeoutError,
                exceptions.ConnectTimeoutError, exceptions.ConnectionClosedError) as error:
            raise TransientError(str(error)) from None

    def _raw_put(self, name, data):
        digest = base64.b64encode(hashlib.md5(data).digest()).decode()
        self._call("put", name, self.client.put_object, Key=name, Body=bytes(data), ContentMD5=digest)

    def _raw_get(self, name, offset, length):
        if length == 0:
            return b""
        arguments = {"Key": name}
        if offset or length is not None:
            arguments["Range"] = f"bytes={offset}-" + ("" if length is None else str(offset + length - 1))
        response = self._call("get", name, self.client.get_object, **arguments)
        try:
            return response["Body"].read()
        except (self._botocore.ReadTimeoutError, self._botocore.ConnectionError, OSError) as error:
            raise TransientError(f"reading {name}: {error}") from None

    def _raw_size(self, name):
        return self._call("stat", name, self.client.head_object, Key=name)["ContentLength"]

    def _raw_list(self, prefix):
        found = []
        token = None
        while True:
            arguments = {"Prefix": prefix}
            if token:
                arguments["ContinuationToken"] = token
            response = self._call("list", prefix, self.client.list_objects_v2, **arguments)
            found.extend(item["Key"] for item in response.get("Contents", ()))
            if not response.get("IsTruncated"):
                return found
            token = response["NextContinuationToken"]

    def _raw_delete(self, name):
        self._call("delete", name, self.client.delete_object, Key=name)
