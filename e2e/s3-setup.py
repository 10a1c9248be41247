#!/usr/bin/env python3
"""Prepares a moto S3 server for tests/e2e_s3.rs. The server is started with
INITIAL_NO_AUTH_ACTION_COUNT=3: its first three requests need no credentials, every later one is
authenticated (SigV4 signature checked) and authorised (IAM policy). Those three create an IAM
user, its access key, and an inline policy allowing S3; then, with that key, a bucket and the
uploads (each with an x-amz-checksum-sha256).

    s3-setup.py ENDPOINT BUCKET [--upload PREFIX DIR]... [--truncate KEY:BYTES]...

`--upload PREFIX DIR` puts every file under DIR at PREFIX + its relative path. `--truncate
KEY:BYTES` stores only the first BYTES bytes of that object (as an interrupted upload leaves it).
Prints the access key id and the secret access key, one per line.
"""
import json
import os
import sys

import boto3


def main():
    args = sys.argv[1:]
    endpoint, bucket, rest = args[0], args[1], args[2:]
    uploads, truncate = [], {}
    while rest:
        flag = rest.pop(0)
        if flag == "--upload":
            uploads.append((rest.pop(0), rest.pop(0)))
        elif flag == "--truncate":
            key, n = rest.pop(0).rsplit(":", 1)
            truncate[key] = int(n)
        else:
            sys.exit(f"s3-setup.py: unknown argument {flag!r}")
    boot = dict(endpoint_url=endpoint, region_name="us-east-1",
                aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
    iam = boto3.client("iam", **boot)
    iam.create_user(UserName="weights")
    key = iam.create_access_key(UserName="weights")["AccessKey"]
    policy = {"Version": "2012-10-17",
              "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    iam.put_user_policy(UserName="weights", PolicyName="s3", PolicyDocument=json.dumps(policy))
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                      aws_access_key_id=key["AccessKeyId"],
                      aws_secret_access_key=key["SecretAccessKey"])
    s3.create_bucket(Bucket=bucket)
    for prefix, src in uploads:
        for root, _, files in os.walk(src):
            for f in sorted(files):
                path = os.path.join(root, f)
                k = prefix + os.path.relpath(path, src)
                with open(path, "rb") as fh:
                    body = fh.read()
                if k in truncate:
                    body = body[: truncate[k]]
                s3.put_object(Bucket=bucket, Key=k, Body=body, ChecksumAlgorithm="SHA256")
    print(key["AccessKeyId"])
    print(key["SecretAccessKey"])


if __name__ == "__main__":
    main()
