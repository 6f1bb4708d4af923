"""s3:// input and output against a real S3-compatible server (moto) on loopback.

The driver does all reading and writing of the real data, the targets, the solves and the final
Parquet (actors receive rows through Ray), so the endpoint only has to be set for this process.
"""

import json

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from gradmm_ray.core.lm import load_causal_lm
from gradmm_ray.distill import cli
from gradmm_ray.io.real_data import DataConfig, load_real_examples
from gradmm_ray.models.tiny import ensure_tiny_model

BUCKET = "gradmm-test"
FAST = [
    "--config", "tiny",  # the fastest settings (the defaults run SmolLM2)
    "--set", "data.per_class=6",
    "--set", "privacy.epsilon=.inf",  # per_class is a deterministic cap: only without noise
    "--set", "solve.candidates_per_class=2",
    "--set", "admm.outer_iters=2",
    "--set", "admm.inner_steps=2",
    "--set", "admm.init_candidates=2",
    "--set", "admm.num_tokens=4",
    "--set", "select.label_check=false",
]  # fmt: skip


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 (a free port), with one bucket; stopped after the module."""
    moto_server = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        fs, _ = pafs.FileSystem.from_uri(f"s3://{BUCKET}/")
        yield fs
    server.stop()


def _upload_jsonl(fs, key: str, rows: list[dict]) -> str:
    with fs.open_output_stream(f"{BUCKET}/{key}") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows).encode())
    return f"s3://{BUCKET}/{key}"


def test_read_real_data_from_s3(s3):
    """A JSONL file on S3 reads and validates like a local one."""
    rows = load_real_examples(DataConfig(per_class=10), seed=0).table.select(["text", "label"])
    uri = _upload_jsonl(s3, "data/reviews.jsonl", rows.to_pylist())
    real = load_real_examples(DataConfig(source=uri), seed=0)
    assert real.counts == {"positive": 10, "negative": 10}
    assert real.table.column("text").to_pylist() == rows.column("text").to_pylist()


def test_pipeline_writes_to_s3_and_resumes_from_it(s3, ray_session, capsys):
    """Real data read from S3; targets, solves, synthetic.parquet and the manifest written to S3;
    the same command again resumes from S3 and recomputes nothing."""
    rows = load_real_examples(DataConfig(per_class=6), seed=0).table.select(["text", "label"])
    data = _upload_jsonl(s3, "in/reviews.jsonl", rows.to_pylist())
    argv = ["--data", data, "--output", f"s3://{BUCKET}/runs/one", *FAST]
    assert cli.main(argv) == 0
    prefix = f"{BUCKET}/runs/one"
    for rel in (
        "synthetic.parquet",
        "manifest.json",
        "targets.safetensors",
        "run.json",
        "report.md",
    ):
        assert s3.get_file_info(f"{prefix}/{rel}").type == pafs.FileType.File, rel
    table = pq.read_table(f"{prefix}/synthetic.parquet", filesystem=s3)
    assert set(table.column("label").to_pylist()) == {"positive", "negative"}
    listing = s3.get_file_info(pafs.FileSelector(prefix, recursive=True))
    assert not [i.path for i in listing if "/.tmp-" in i.path], "a temporary was left behind"
    capsys.readouterr()
    assert cli.main(argv) == 0
    assert "4 work items: 0 solved now, 4 already done" in capsys.readouterr().out


def test_model_folder_from_s3(s3, tmp_path, monkeypatch, capsys):
    """model.name s3://... copies the folder into the cache once (saying so) and loads it with
    from_pretrained."""
    local = ensure_tiny_model()
    monkeypatch.setenv("GRADMM_CACHE", str(tmp_path))  # an empty cache: the copy must happen
    pafs.copy_files(
        str(local),
        f"{BUCKET}/models/tiny",
        source_filesystem=pafs.LocalFileSystem(),
        destination_filesystem=s3,
    )
    lm = load_causal_lm(f"s3://{BUCKET}/models/tiny", device="cpu")
    reference = load_causal_lm("tiny", device="cpu")
    assert lm.vocab_size == reference.vocab_size
    assert (lm.head.weight == reference.head.weight).all()
    assert len(list((tmp_path / "models").iterdir())) == 1
    load_causal_lm(f"s3://{BUCKET}/models/tiny", device="cpu")  # from the cache, silently
    err = capsys.readouterr().err
    assert err.count(f"gradmm-ray: copying the model folder s3://{BUCKET}/models/tiny") == 1
