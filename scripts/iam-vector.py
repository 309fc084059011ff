#!/usr/bin/env python3
"""Makes tests/data/elasticache-iam-vector.json: ElastiCache IAM authentication tokens presigned by
botocore (AWS's own SDK for Python) with fixed credentials and a frozen clock, so that stickless's
token can be compared with AWS's byte for byte, without Python or AWS at test time.

The token is made the way AWS documents it for ElastiCache (and as redis-py's ElastiCache example
does): a SigV4 query-string presign of GET http://<cache-name>/?Action=connect&User=<user-id>
(plus &ResourceType=ServerlessCache for a serverless cache), service "elasticache", valid 900 s,
with the scheme taken off.

    python3 -m venv /tmp/iam-vector && /tmp/iam-vector/bin/pip install botocore==1.44.8
    /tmp/iam-vector/bin/python scripts/iam-vector.py

It signs offline: nothing is sent anywhere.
"""

import datetime
import json
import pathlib
from unittest import mock
from urllib.parse import urlencode

import botocore
import botocore.auth
from botocore.credentials import Credentials
from botocore.hooks import HierarchicalEmitter
from botocore.model import ServiceId
from botocore.signers import RequestSigner

# AWS's documented example keys: not real credentials.
ACCESS_KEY = "AKIAIOSFODNN7EXAMPLE"
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
# A session token with the characters that must be percent-encoded in a query (/, + and =).
SESSION_TOKEN = "IQoJb3JpZ2luX2VjEXAMPLE/session+token//with=padding=="
SIGNED_AT = datetime.datetime(2026, 11, 26, 9, 30, 15)  # UTC
EXPIRES = 900

CASES = [
    {
        "name": "replication group, temporary credentials (the EC2 instance role)",
        "cache_name": "my-sessions",
        "user_id": "stickless",
        "region": "us-east-1",
        "serverless": False,
        "session_token": SESSION_TOKEN,
    },
    {
        "name": "serverless cache, temporary credentials",
        "cache_name": "sessions-serverless",
        "user_id": "stickless-app",
        "region": "eu-west-3",
        "serverless": True,
        "session_token": SESSION_TOKEN,
    },
    {
        "name": "replication group, long-term keys (no session token)",
        "cache_name": "prod-sessions-001",
        "user_id": "app-user",
        "region": "ap-southeast-2",
        "serverless": False,
        "session_token": None,
    },
]


def token(case):
    credentials = Credentials(ACCESS_KEY, SECRET_KEY, case["session_token"])
    # The signer holds its event emitter weakly: it must outlive the signing.
    events = HierarchicalEmitter()
    signer = RequestSigner(
        ServiceId("elasticache"),
        case["region"],
        "elasticache",
        "v4",
        credentials,
        events,
    )
    query = {"Action": "connect", "User": case["user_id"]}
    if case["serverless"]:
        query["ResourceType"] = "ServerlessCache"
    url = f"http://{case['cache_name']}/?{urlencode(query)}"
    request = {"method": "GET", "url": url, "body": {}, "headers": {}, "context": {}}
    with mock.patch.object(botocore.auth, "get_current_datetime", return_value=SIGNED_AT):
        signed = signer.generate_presigned_url(
            request, operation_name="connect", expires_in=EXPIRES, region_name=case["region"]
        )
    assert signed.startswith("http://"), signed
    return signed[len("http://"):]


def main():
    vector = {
        "made_by": f"scripts/iam-vector.py with botocore {botocore.__version__}",
        "access_key_id": ACCESS_KEY,
        "secret_access_key": SECRET_KEY,
        "signed_at": SIGNED_AT.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "signed_at_unix": int(SIGNED_AT.replace(tzinfo=datetime.timezone.utc).timestamp()),
        "expires_seconds": EXPIRES,
        "cases": [dict(case, token=token(case)) for case in CASES],
    }
    out = pathlib.Path(__file__).resolve().parent.parent / "tests" / "data" / "elasticache-iam-vector.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(vector, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
