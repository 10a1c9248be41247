#!/usr/bin/env python3
"""Sets up a moto S3 server (started with INITIAL_NO_AUTH_ACTION_COUNT=3, so every request after
the first three is authenticated and authorised) for the S3 checkpoint e2e test: an IAM user with
an access key and an inline policy allowing S3 reads and writes (the three unauthenticated
actions), then a bucket and the given files uploaded with that key.

    s3-setup.py ENDPOINT BUCKET PREFIX DIR [--truncate NAME:BYTES]...

Prints the access key id and secret, one per line. `--truncate NAME:BYTES` uploads only the first
BYTES bytes of DIR/NAME (a truncated object, as an interrupted upload leaves it).
"""
import json
import os
import sys

import boto3


def main():
    args = sys.argv[1:]
    truncate = {}
    while "--truncate" in args:
        i = args.index("--truncate")
        name, n = args[i + 1].rsplit(":", 1)
        truncate[name] = int(n)
        del args[i : i + 2]
    endpoint, bucket, prefix, src = args
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
    for root, _, files in os.walk(src):
        for f in sorted(files):
            path = os.path.join(root, f)
            rel = os.path.relpath(path, src)
            with open(path, "rb") as fh:
                body = fh.read()
            if rel in truncate:
                body = body[: truncate[rel]]
            s3.put_object(Bucket=bucket, Key=prefix + rel, Body=body)
    print(key["AccessKeyId"])
    print(key["SecretAccessKey"])


if __name__ == "__main__":
    main()
