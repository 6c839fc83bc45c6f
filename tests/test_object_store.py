"""The pipeline with its run folder in an object store, as on a TPU pod (`--workdir gs://...`).

A Cloud Storage emulator (gcp-storage-emulator) serves a bucket on localhost; every client
the pipeline uses is pointed at it: gcsfs (etils.epath: run files), tensorstore (orbax:
checkpoints) and the Cloud Storage client inside array_record (reading the prepared data).
Every step runs once with its workdir, and so its prepared data, in the bucket and once in a
local folder; the bucket must hold the run's files and every recorded number must be the local
run's.
"""

from http import HTTPStatus
import http.server
import json
import math
import os
import socket
import subprocess
import sys

import pytest

# The emulator serves Cloud Storage's JSON API only: gcsfs must not first ask a bucket's layout
# over gRPC (read when gcsfs is imported).
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
gcsfs = pytest.importorskip("gcsfs", reason="gcsfs (the test extras) reads gs:// paths")
emulator = pytest.importorskip("gcp_storage_emulator.server",
                               reason="gcp-storage-emulator (the test extras) serves the bucket")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "rsllm-test"
# The smallest pipeline that still runs every step: one rec epoch, two steps of each LLM step
# (a checkpoint each), stage 2 from stage 1, the whole-catalogue evaluation.
FLAGS = [
    "--config.jobs=prepare,rec,pretrain,stage1,stage2,eval", "--config.data.synthetic.num_users=60",
    "--config.data.synthetic.num_items=30", "--config.model.demo_vocab_size=400",
    "--config.prompts.length_buckets=512", "--config.rec.max_epochs=1", "--config.pretrain.steps=2",
    "--config.pretrain.batch_size=8", "--config.pretrain.checkpoint_every=2",
    "--config.train.batch_size=8", "--config.train.checkpoint_every=2",
    "--config.stage1.max_steps=2", "--config.stage2.max_steps=2", "--config.eval.batch_size=8",
    "--config.eval.max_new_tokens=4", "--config.eval.constrained=False",
    "--config.eval.ranking=False", "--config.eval.retrieve_k=12"
]
STEPS = ("prepare", "rec", "pretrain", "stage1", "stage2", "eval")
# Numbers that depend on the machine's speed or the run folder, not on the computation.
UNTIMED = {"seconds", "train_seconds", "tokens_per_second", "path", "hf_path", "embeddings"}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _with_generation(download):
    """The emulator's object download, answering with the object's generation as Cloud Storage
    does (`x-goog-generation`): tensorstore, under orbax, reads it for its conditional writes,
    and without it cannot write an orbax checkpoint's manifest a second time."""

    def download_with_generation(request, response, storage, *args, **kwargs):
        download(request, response, storage, *args, **kwargs)
        if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = obj["generation"]
            response["x-goog-metageneration"] = obj["metageneration"]

    return download_with_generation


class _QuietHTTPServer(http.server.HTTPServer):
    """The emulator's HTTP server, without a traceback for each client that closes its
    connection before the whole answer is sent (readers that need part of an object)."""

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@pytest.fixture(scope="module")
def store():
    """(endpoint URL, gcsfs file system) of an in-memory emulator holding an empty bucket."""
    from gcp_storage_emulator.handlers import objects

    port = _free_port()
    with pytest.MonkeyPatch.context() as patch:
        # `objects.get` (the JSON API's `?alt=media` reads) calls the module's `download`.
        patch.setattr(objects, "download", _with_generation(objects.download))
        patch.setattr(http.server, "HTTPServer", _QuietHTTPServer)
        server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
        server.start()
        url = f"http://127.0.0.1:{port}"
        try:
            yield url, gcsfs.GCSFileSystem(endpoint_url=url, token="anon", use_listings_cache=False)
        finally:
            server.stop()


def _emulator_env(url):
    """The variables that point every Cloud Storage client at the emulator at `url`."""
    return dict(
        STORAGE_EMULATOR_HOST=url,
        FSSPEC_GCS_TOKEN="anon",  # gcsfs, through fsspec
        GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",
        TENSORSTORE_GCS_HTTP_URL=url,  # orbax
        CLOUD_STORAGE_EMULATOR_ENDPOINT=url,  # array_record's reader
        # No credentials: no client may look for a cloud metadata server elsewhere.
        NO_GCE_CHECK="true",
        GCE_METADATA_HOST="127.0.0.1:9",
        GCE_METADATA_IP="127.0.0.1:9",
        GCE_METADATA_ROOT="127.0.0.1:9")


def _env(url):
    """The environment of a pipeline whose gs:// paths reach the emulator at `url` (local
    paths only without one)."""
    env = dict(
        os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
        PYTHONPATH=os.pathsep.join([REPO] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    env.pop("JAX_COORDINATOR_ADDRESS", None)
    if url:
        env.update(_emulator_env(url))
    return env


@pytest.fixture
def bucket(store, monkeypatch):
    """This process's gs:// paths reach the emulator: the bucket's URL."""
    import fsspec.config

    url, _ = store
    for key, value in _emulator_env(url).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setitem(fsspec.config.conf, "gcs",
                        dict(fsspec.config.conf.get("gcs", {}), token="anon"))
    return f"gs://{BUCKET}"


def _run(workdir, cwd, url=None):
    result = subprocess.run([
        sys.executable, "-m", "rsllm_jax.main", "--config",
        os.path.join(REPO, "configs", "demo.py"), "--workdir", workdir, *FLAGS
    ], cwd=cwd, env=_env(url), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stderr


def _differences(a, b, path=""):
    if isinstance(a, dict) and isinstance(b, dict):
        keys = (set(a) | set(b)) - UNTIMED
        return [d for k in sorted(keys) for d in _differences(a.get(k), b.get(k), f"{path}{k}.")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{path}{i}.")]
    if isinstance(a, float) and isinstance(b, float):
        return [] if math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-7) else [(path, a, b)]
    return [] if a == b else [(path, a, b)]


def test_pipeline_with_its_workdir_in_a_bucket_equals_a_local_run(store, tmp_path):
    url, fs = store
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    _run("local_run", cwd)  # A relative local workdir.
    local = cwd / "local_run"
    bucket_cwd = tmp_path / "bucket_cwd"
    bucket_cwd.mkdir()
    _run(f"gs://{BUCKET}/run", bucket_cwd, url)
    # Nothing went to a local folder named after the URL.
    assert not list(bucket_cwd.iterdir())

    run = f"{BUCKET}/run"
    for step in STEPS:
        record = json.loads(fs.cat(f"{run}/metrics/{step}.json"))
        expected = json.loads((local / "metrics" / f"{step}.json").read_text())
        assert record["config"] == expected["config"], step
        assert not _differences(expected["metrics"], record["metrics"]), step
    assert fs.cat(f"{run}/metrics/predictions_test.jsonl") == \
        (local / "metrics" / "predictions_test.jsonl").read_bytes()
    assert json.loads(fs.cat(f"{run}/config.json")) == \
        json.loads((local / "config.json").read_text())
    # The prepared data (read back by every later step through array_record's reader), the
    # item table and the recommender, the checkpoints and kept parameters of every training
    # step, the pre-trained base as a Hugging Face folder.
    assert [p for p in fs.find(f"{run}/data/tfds") if "-train.array_record" in p]
    for name in ("data/dataset.json", "data/catalogue.json", "rec/item_embeddings.npy",
                 "rec/item_embeddings.json"):
        assert fs.cat(f"{run}/{name}") == (local / name).read_bytes(), name
    # (SentencePiece records the local folder it was trained in: the bytes differ.)
    assert fs.exists(f"{run}/tokenizer/tokenizer.model")
    assert fs.exists(f"{run}/rec/recommender/recommender.json")
    assert fs.exists(f"{run}/rec/recommender/params/_CHECKPOINT_METADATA")
    assert fs.glob(f"{run}/rec/*_*/seed_0/checkpoints/*/_CHECKPOINT_METADATA")
    for name in ("pretrain", "stage1", "stage2"):
        assert fs.exists(f"{run}/{name}/checkpoints/2/_CHECKPOINT_METADATA"), name
        assert fs.exists(f"{run}/{name}/final/_CHECKPOINT_METADATA"), name
    for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
        assert fs.exists(f"{run}/pretrain/hf/{name}"), name
    # The curves of every training and evaluation step, as the local run wrote them.
    for name in ("pretrain", "stage1", "stage2", "eval"):
        lines = fs.cat(f"{run}/{name}/metrics.jsonl").decode().splitlines()
        expected = (local / name / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in lines] == \
            [json.loads(line)["step"] for line in expected], name
        assert fs.glob(f"{run}/{name}/tensorboard/events.out.tfevents.*"), name

    # Run again: every step finds its metrics file in the bucket and is skipped.
    log = _run(f"gs://{BUCKET}/run", bucket_cwd, url)
    for step in STEPS:
        assert f"step {step}: done already" in log, step


def test_run_file_operations_in_a_bucket(bucket, store, tmp_path):
    from rsllm_jax import run_paths

    _, fs = store
    folder = f"{bucket}/files"
    run_paths.write_text(f"{folder}/a/metrics.json", '{"x": 1}')
    assert fs.cat(f"{BUCKET}/files/a/metrics.json") == b'{"x": 1}'
    with run_paths.local_folder(f"{folder}/hf") as local:  # Uploaded when the block ends.
        assert not run_paths.is_url(local)
        os.makedirs(os.path.join(local, "sub"))
        with open(os.path.join(local, "sub", "w.bin"), "wb") as f:
            f.write(b"weights")
    assert fs.cat(f"{BUCKET}/files/hf/sub/w.bin") == b"weights"
    run_paths.copy_tree(f"{folder}/hf", f"{folder}/copy")  # Bucket to bucket.
    assert fs.cat(f"{BUCKET}/files/copy/sub/w.bin") == b"weights"
    local = run_paths.local_copy(f"{folder}/copy")  # Bucket to a local folder.
    with open(os.path.join(local, "sub", "w.bin"), "rb") as f:
        assert f.read() == b"weights"
    assert run_paths.absolute(f"{folder}/x") == run_paths.as_path(f"{folder}/x")
    assert str(run_paths.absolute("runs/x")) == os.path.abspath("runs/x")
    with pytest.raises(RuntimeError), run_paths.local_folder(f"{folder}/failed") as local:
        open(os.path.join(local, "partial"), "w").close()
        raise RuntimeError("the writer failed")
    assert not fs.exists(f"{BUCKET}/files/failed/partial")  # Nothing half-written uploaded.


def test_damaged_checkpoint_in_a_bucket_is_moved_aside(bucket, store):
    import jax.numpy as jnp
    import numpy as np
    import orbax.checkpoint as ocp

    from rsllm_jax.checkpoint.resume import RunCheckpointer

    _, fs = store
    checkpointer = RunCheckpointer(f"{bucket}/resume/checkpoints", "test", max_to_keep=3)
    for step, weights in ((1, jnp.ones(4)), (2, jnp.array([1.0, np.nan, 1.0, 1.0]))):
        checkpointer.save(step, {"w": weights}, {"step": step}, force=True)
    checkpointer.manager.wait_until_finished()
    state, _, progress = checkpointer.restore({"w": ocp.utils.to_shape_dtype_struct(jnp.zeros(4))},
                                              with_data=False)
    assert progress == {"step": 1}
    np.testing.assert_array_equal(state["w"], np.ones(4))
    assert checkpointer.manager.all_steps() == [1]
    checkpointer.manager.close()
    assert fs.find(f"{BUCKET}/resume/checkpoints-damaged/2")
    assert not fs.find(f"{BUCKET}/resume/checkpoints/2")
