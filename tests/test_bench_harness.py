"""The benchmarks' measuring helpers: what they report must follow from what arrived."""
import pytest
import requests

from bench.harness import stamped_frames, ttft_and_rate
from inferq.client import parse_sse


def test_tokens_that_arrive_together_are_not_counted_as_decoded_in_no_time():
    # Three reads: token 1 alone at 0.10 s, tokens 2-4 at 0.20 s, tokens 5-6 at 0.30 s.
    ttft, rate = ttft_and_rate(0.0, [0.10, 0.20, 0.20, 0.20, 0.30, 0.30])
    assert ttft == pytest.approx(100)
    assert rate == pytest.approx(5 / 0.20)
    # The first read brought four: only the two later ones count, over the time after it.
    assert ttft_and_rate(0.0, [0.10, 0.10, 0.10, 0.10, 0.30, 0.30])[1] == pytest.approx(2 / 0.20)
    # Everything in one read: no time to divide by, so the rate is over the whole request.
    assert ttft_and_rate(0.0, [0.25] * 5)[1] == pytest.approx(5 / 0.25)
    # A known token count (several tokens in one frame) replaces the number of stamps.
    assert ttft_and_rate(0.0, [0.10, 0.20, 0.30], tokens=5)[1] == pytest.approx(4 / 0.20)


def test_stamped_frames_reads_a_real_stream_with_one_stamp_per_read(live_api, tiny_worker):
    job = requests.post(f"{live_api}/v1/jobs", json={"operation": "infer", "model": "tiny", "prompt": "a",
                                                      "max_tokens": 40, "temperature": 0}).json()["job_id"]
    with requests.get(f"{live_api}/v1/jobs/{job}/stream", stream=True, timeout=30) as resp:
        frames = list(stamped_frames(resp))
    events = [frame["event"] for _, frame in frames]
    assert events[0] == "queued" and events[-1] == "end"
    assert [int(frame["id"]) for _, frame in frames] == list(range(len(frames)))
    assert [at for at, _ in frames] == sorted(at for at, _ in frames)
    # The same frames as the client library's own parser reads.
    with requests.get(f"{live_api}/v1/jobs/{job}/stream", stream=True, timeout=30) as resp:
        assert list(parse_sse(resp.iter_lines())) == [frame for _, frame in frames]
    # A finished job's stream is its log, replayed in a few large writes: the frames
    # share the stamps of the few reads that brought them.
    with requests.get(f"{live_api}/v1/jobs/{job}/stream", stream=True, timeout=30) as resp:
        replayed = list(stamped_frames(resp))
    assert [frame for _, frame in replayed] == [frame for _, frame in frames]
    assert len({at for at, _ in replayed}) < len(replayed) / 4
