# Test cases for ../transfer-worker.yaml: `semgrep scan --test .semgrep`.
# Not imported or run by anything; it only has to parse.
# ruff: noqa
import asyncio
import logging
import os
import pickle
import ssl
import subprocess
import time

import boto3
import requests
import yaml

log = logging.getLogger(__name__)


def shells(bucket):
    # ruleid: subprocess-shell-true
    subprocess.run(f"aws s3 cp s3://{bucket}/x .", shell=True)
    # ruleid: subprocess-shell-true
    os.system("ls " + bucket)
    # ok: subprocess-shell-true
    subprocess.run(["aws", "s3", "cp", f"s3://{bucket}/x", "."], check=True)


def yamls(text):
    # ruleid: yaml-load-without-safe-loader
    yaml.load(text)
    # ruleid: yaml-load-without-safe-loader
    yaml.load(text, Loader=yaml.Loader)
    # ruleid: yaml-load-without-safe-loader
    yaml.unsafe_load(text)
    # ok: yaml-load-without-safe-loader
    yaml.load(text, Loader=yaml.SafeLoader)
    # ok: yaml-load-without-safe-loader
    yaml.safe_load(text)


def deserialise(body):
    # ruleid: unsafe-deserialisation
    pickle.loads(body)
    # ruleid: unsafe-deserialisation
    eval(body)


def logs(session, config, assumed):
    # ruleid: environment-in-logs
    log.info("starting with %s", os.environ)
    # ruleid: environment-in-logs
    log.debug("env", extra={"env": dict(os.environ)})
    # ruleid: environment-in-logs
    print(os.environ)
    # ok: environment-in-logs
    log.info("role %s", os.environ.get("TRANSFER_WORKER_AWS_ROLE_ARN"))
    # ok: environment-in-logs
    subprocess.run(["true"], env=os.environ, check=True)
    # ruleid: credentials-in-logs
    log.info("assumed role", secret_access_key=config.secret)
    # ruleid: credentials-in-logs
    log.bind(session_token=assumed)
    # ok: credentials-in-logs
    log.info("assumed role", role_arn=config.role_arn, expires=config.expiry)
    # ruleid: credentials-object-in-logs
    log.info("credentials %s", session.get_credentials())
    # ok: credentials-object-in-logs
    log.info("credential source %s", session.get_credentials().method)


def waits(stop_event):
    # ruleid: no-time-sleep-in-worker
    time.sleep(1.0)
    # ok: no-time-sleep-in-worker
    stop_event.wait(1.0)


async def waits_async():
    # ruleid: no-time-sleep-in-worker
    await asyncio.sleep(1)


def excepts(work):
    # ruleid: bare-except
    try:
        work()
    except:
        pass
    # ok: bare-except
    try:
        work()
    except OSError:
        pass


def tls(url):
    # ruleid: tls-verification-disabled
    requests.get(url, verify=False, timeout=5)
    # ruleid: tls-verification-disabled
    boto3.client("s3", verify=False)
    # ruleid: tls-verification-disabled
    ssl._create_unverified_context()
    # ok: tls-verification-disabled
    requests.get(url, timeout=5)


def keys():
    # ruleid: hardcoded-aws-access-key-id
    key_id = "AKIAIOSFODNN7EXAMPLE"
    # ok: hardcoded-aws-access-key-id
    not_a_key = "AKIA-is-a-prefix"
    # ruleid: hardcoded-credential-argument
    boto3.client("s3", aws_access_key_id="x", aws_secret_access_key="wJalrXUtnFEMI")
    # ok: hardcoded-credential-argument
    boto3.client("s3", aws_access_key_id=os.environ.get("K"))
    return key_id, not_a_key
