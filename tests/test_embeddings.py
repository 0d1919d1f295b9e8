"""Embeddings: the contract's ``embed`` operation and OpenAI's /v1/embeddings, run by real workers."""
import base64
import time

import numpy as np
import openai
import pytest
import requests

from tests.helpers import events, skip_without_llama_cpp


@pytest.fixture(scope="module")
def embed_worker(module_workers, slow_model):
    skip_without_llama_cpp()
    return module_workers("embedder", slow_model, "--backend", "llama-cpp", "--parallel", "2")


@pytest.fixture()
def oai(live_api):
    return openai.OpenAI(base_url=f"{live_api}/v1", api_key="unused", max_retries=0, timeout=60)


def embed(client, **fields) -> str:
    resp = client.post("/v1/jobs", json={"operation": "embed", "model": "embedder", **fields})
    assert resp.status_code == 202, resp.get_data(as_text=True)
    return resp.get_json()["job_id"]


def vector(event) -> np.ndarray:
    return np.frombuffer(base64.b64decode(event["embedding"]), dtype="<f4")


def test_an_embed_job_streams_one_event_per_input_then_ends(client, embed_worker):
    job = embed(client, input=["the data model", "import queue", "the data model"])
    evts = events(client, job)
    kinds = [e["type"] for e in evts if e["type"] != "narration"]
    assert kinds == ["queued", "started", "embedding", "embedding", "embedding", "metrics", "end"]
    embs = [e for e in evts if e["type"] == "embedding"]
    assert [e["index"] for e in embs] == [0, 1, 2] and all(e["dims"] == 256 for e in embs)
    vecs = [vector(e) for e in embs]
    assert all(abs(np.linalg.norm(v) - 1) < 1e-5 for v in vecs)  # L2-normalized, as OpenAI's are
    assert np.allclose(vecs[0], vecs[2], atol=1e-6) and not np.allclose(vecs[0], vecs[1], atol=1e-3)
    metrics = next(e for e in evts if e["type"] == "metrics")
    assert metrics["prompt_tokens"] == sum(e["tokens"] for e in embs) and metrics["tokens_out"] == 0
    end = evts[-1]
    assert end["stop_reason"] == "done" and end["tokens_out"] == 0 and end["text"] == ""
    status = client.get(f"/v1/jobs/{job}").get_json()
    assert status["state"] == "finished"


def test_the_vectors_are_llama_cpp_pythons_own(client, embed_worker, slow_model):
    """llama-cpp-python's high-level Llama (mean pooling, normalized) agrees with the worker."""
    from llama_cpp import LLAMA_POOLING_TYPE_MEAN, Llama

    texts = ["the data model", "def worker(job):"]
    evts = events(client, embed(client, input=texts))
    ours = [vector(e) for e in evts if e["type"] == "embedding"]
    llm = Llama(str(slow_model), embedding=True, pooling_type=LLAMA_POOLING_TYPE_MEAN, n_ctx=512, n_threads=1,
                verbose=False)
    try:
        theirs = [np.asarray(llm.embed(t, normalize=True), dtype=np.float32) for t in texts]
    finally:
        llm.close()
    for a, b in zip(ours, theirs):
        assert np.allclose(a, b, atol=1e-4), float(np.abs(a - b).max())


def test_openai_embeddings_in_floats_and_base64(oai, live_api, client, embed_worker):
    texts = ["the data model", "import queue"]
    resp = oai.embeddings.create(model="embedder", input=texts)  # the SDK asks for base64 and decodes it
    assert [d.index for d in resp.data] == [0, 1] and len(resp.data[0].embedding) == 256
    assert resp.usage.prompt_tokens == resp.usage.total_tokens > 0
    raw = requests.post(f"{live_api}/v1/embeddings", timeout=60,
                        json={"model": "embedder", "input": texts, "encoding_format": "float"}).json()
    assert raw["object"] == "list" and raw["model"] == "embedder"
    for sdk, plain in zip(resp.data, raw["data"]):
        assert plain["object"] == "embedding" and np.allclose(sdk.embedding, plain["embedding"], atol=1e-6)
    one = oai.embeddings.create(model="embedder", input="the data model", encoding_format="float")
    assert np.allclose(one.data[0].embedding, resp.data[0].embedding, atol=1e-6)
    ids = oai.embeddings.create(model="embedder", input=[[1, 300, 301], [1, 302]], encoding_format="float")
    assert len(ids.data) == 2 and ids.usage.prompt_tokens == 5


def test_many_inputs_go_in_batches_while_a_generation_streams_on(client, embed_worker):
    from tests.helpers import submit

    running = submit(client, model="embedder", prompt="busy", max_tokens=1200, temperature=0,
                     repetition_penalty=1.0)
    events(client, running, until="token")
    texts = [f"input number {i} about the queue worker" for i in range(40)]  # 16 per decode: three batches
    t0 = time.monotonic()
    evts = events(client, embed(client, input=texts))
    took = time.monotonic() - t0
    assert [e["index"] for e in evts if e["type"] == "embedding"] == list(range(40))
    stream = events(client, running)
    stamps = [e["ts"] for e in stream if e["type"] == "token"]
    assert stream[-1]["type"] == "end" and stream[-1]["tokens_out"] == 1200
    print(f"40 inputs embedded in {took * 1000:.0f} ms; longest token gap {max(np.diff(stamps))} ms")
    assert max(np.diff(stamps)) < 500  # the embed job ran between decode steps, a batch at a time


def test_bad_embed_inputs(client, embed_worker, oai):
    too_long = events(client, embed(client, input="the data model " * 1500))  # past the 2048-token context
    assert too_long[-1]["code"] == "CONTEXT_LENGTH_EXCEEDED"
    bad_id = events(client, embed(client, input=[[1, 10 ** 6]]))
    assert bad_id[-1]["code"] == "INVALID_REQUEST" and "below" in bad_id[-1]["message"]
    for body in ({"input": []}, {"input": [""]}, {"input": ["x"] * 2049}, {"input": "x", "prompt": "y"}):
        resp = client.post("/v1/jobs", json={"operation": "embed", "model": "embedder", **body})
        assert resp.status_code == 422, body
    with pytest.raises(openai.BadRequestError) as info:
        oai.embeddings.create(model="embedder", input="x", dimensions=8)
    assert info.value.body["param"] == "dimensions"


def test_a_worker_that_cannot_embed_is_refused_at_submit(client, worker_factory, tiny_model, oai):
    worker_factory("embed-ct", tiny_model, "--backend", "ctransformers")
    resp = client.post("/v1/jobs", json={"operation": "embed", "model": "embed-ct", "input": "x"})
    assert resp.status_code == 400 and resp.get_json()["error"]["code"] == "UNSUPPORTED_FEATURE"
    with pytest.raises(openai.BadRequestError) as info:
        oai.embeddings.create(model="embed-ct", input="x")
    assert info.value.body["code"] == "unsupported_feature"
    models = {m["id"]: m for m in client.get("/v1/models").get_json()["data"]}
    assert models["embed-ct"]["embedding_length"] == 0 and models["embedder"]["embedding_length"] == 256
