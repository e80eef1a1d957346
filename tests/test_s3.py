"""The storage layer and the preparation job against a real S3 server (Ceph RADOS Gateway)."""

import os
import subprocess
import sys

import pytest
from conftest import REPO, make_documents

from generalmodel.config import StorageConfig, load_config
from generalmodel.data.loader import TokenDataset, TokenLoader
from generalmodel.storage import StorageError, resolve
from jobs import prepare_data


def storage(s3, **kw):
    return StorageConfig(endpoint_url=s3.endpoint, access_key_id=s3.key, secret_access_key=s3.secret, **kw)


def test_atomic_write_and_listing(s3_server):
    bucket = s3_server.new_bucket()
    loc = resolve(f"s3://{bucket}/a/b", storage(s3_server))
    loc.join("x.bin").write_bytes(b"hello")
    assert loc.join("x.bin").read_bytes() == b"hello"
    assert [i.path for i in loc.list_files()] == [f"{bucket}/a/b/x.bin"]
    loc.delete_dir()
    assert not loc.join("x.bin").exists()


def test_prepare_from_s3_to_s3_and_read_back(ray_cluster, s3_server):
    bucket = s3_server.new_bucket()
    client = s3_server.client()
    docs = make_documents(30, seed=5)
    for i, doc in enumerate(docs):
        client.put_object(Bucket=bucket, Key=f"corpus/part{i:02d}.txt", Body=doc.encode())
    overrides = {
        "data.source": f"s3://{bucket}/corpus",
        "data.output": f"s3://{bucket}/datasets/c",
        "data.vocab_size": 400,
        "data.seq_len": 32,
        "data.val_fraction": 0.1,
        **s3_server.storage_overrides(),
    }
    manifest = prepare_data.main(load_config(overrides=overrides))
    assert manifest["source"]["files"] == 30
    assert manifest["config"]["storage"]["secret_access_key"] == "**********"

    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="datasets/c/")["Contents"]}
    assert "datasets/c/manifest.json" in keys
    assert {f"datasets/c/{s['path']}" for s in manifest["splits"]["train"]["shards"]} <= keys

    ds = TokenDataset.open(f"s3://{bucket}/datasets/c", storage(s3_server))
    ds.verify()
    x, y = next(TokenLoader(ds, "train", batch_size=4))
    assert x.shape == (4, 32)

    with pytest.raises(Exception, match="already holds a dataset"):
        prepare_data.main(load_config(overrides=overrides))


def test_prefix_without_manifest_is_refused(s3_server):
    bucket = s3_server.new_bucket()
    s3_server.client().put_object(Bucket=bucket, Key="ds/v-1/train/part-00000.parquet", Body=b"x")
    with pytest.raises(StorageError, match="files but no manifest.json"):
        TokenDataset.open(f"s3://{bucket}/ds", storage(s3_server))


def run_job(args, env_overrides):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "RAY_ADDRESS"}
    env.update(env_overrides)
    return subprocess.run(
        [sys.executable, str(REPO / "jobs/prepare_data.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=REPO,
    )


def test_bad_storage_is_a_clear_error_and_secrets_stay_out(s3_server):
    bucket = s3_server.new_bucket()
    good = {
        "AWS_ENDPOINT_URL": s3_server.endpoint,
        "AWS_ACCESS_KEY_ID": s3_server.key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret,
    }
    cases = [
        ({**good, "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, f"s3://{bucket}/ds", "cannot reach the S3 endpoint"),
        (good, "s3://no-such-bucket-here/ds", "bucket 'no-such-bucket-here' does not exist"),
        ({**good, "AWS_SECRET_ACCESS_KEY": "wrong-secret"}, f"s3://{bucket}/ds", "rejected the credentials"),
    ]
    for env, output, message in cases:
        result = run_job([f"--data.output={output}", "--data.vocab_size=300"], env)
        assert result.returncode == 2, result.stderr[-2000:]
        assert message in result.stderr, result.stderr[-2000:]
        assert "wrong-secret" not in result.stderr + result.stdout
        assert s3_server.secret not in result.stderr + result.stdout
    listed = s3_server.client().list_objects_v2(Bucket=bucket)
    assert listed.get("KeyCount", 0) == 0  # nothing was written


def test_the_default_job_writes_to_s3_with_env_credentials(s3_server):
    """`python jobs/prepare_data.py` on the built-in corpus, pointed at S3 by the AWS env vars."""
    bucket = s3_server.new_bucket()
    env = {
        "AWS_ENDPOINT_URL": s3_server.endpoint,
        "AWS_ACCESS_KEY_ID": s3_server.key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret,
    }
    result = run_job([f"--storage.root=s3://{bucket}/store", "--config", "configs/tiny.yaml", "--ray.num_cpus=2"], env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"published s3://{bucket}/store/datasets/sotu-tiny" in result.stdout
    cfg = StorageConfig(
        endpoint_url=s3_server.endpoint, access_key_id=s3_server.key, secret_access_key=s3_server.secret
    )
    ds = TokenDataset.open(f"s3://{bucket}/store/datasets/sotu-tiny", cfg)
    assert ds.vocab_size == 512 and ds.rows("train") > 1000
