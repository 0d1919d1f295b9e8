"""UTF-8 joining and stop-string hold-back, token by token."""
import numpy as np

from worker.sampling import Sampler
from worker.text_assembler import TextAssembler, split_incomplete_utf8


def feed(assembler, pieces):
    out = [assembler.push(p) for p in pieces]
    out.append(assembler.finish())
    return out


def test_multibyte_characters_split_across_tokens_are_joined():
    data = "a😀漢é".encode()
    pieces = [data[i:i + 1] for i in range(len(data))]  # one byte per token
    out = feed(TextAssembler(), pieces)
    assert "".join(out) == "a😀漢é"
    assert all(isinstance(o, str) for o in out)
    assert [o for o in out if o] == ["a", "😀", "漢", "é"]


def test_invalid_bytes_become_replacement_characters():
    out = feed(TextAssembler(), [b"\xff", b"ok", b"\xe6\xbc"])  # a stray byte, and a truncated tail
    assert "".join(out) == "\ufffdok\ufffd"


def test_split_incomplete_utf8():
    assert split_incomplete_utf8("é".encode()[:1]) == (b"", b"\xc3")
    assert split_incomplete_utf8(b"ab\xf0\x9f\x98") == (b"ab", b"\xf0\x9f\x98")
    assert split_incomplete_utf8("😀".encode()) == ("😀".encode(), b"")
    assert split_incomplete_utf8(b"\x80\x80\x80\x80") == (b"\x80\x80\x80\x80", b"")


def test_stop_string_split_across_tokens_never_leaks():
    a = TextAssembler(["STOP"])
    out = [a.push(b"hello S"), a.push(b"T"), a.push(b"OP and more")]
    assert "".join(out) == "hello "
    assert a.stopped and a.text == "hello "
    assert a.finish() == ""


def test_held_back_prefix_is_released_when_it_is_not_a_stop():
    a = TextAssembler(["STOP"])
    out = [a.push(b"ST"), a.push(b"ay"), a.finish()]
    assert out == ["", "STay", ""]
    assert not a.stopped


def test_earliest_of_several_stops_wins():
    a = TextAssembler(["world", "lo w"])
    assert a.push(b"hello world") == "hel"


def test_greedy_sampling_is_argmax_and_seeded_sampling_repeats():
    logits = np.array([0.1, 3.0, 0.2, 2.9], dtype=np.float32)
    assert Sampler(temperature=0, repetition_penalty=1.0)(logits, []) == 1
    draws = [[Sampler(temperature=1.0, top_k=0, top_p=1.0, seed=7)(logits, []) for _ in range(1)] for _ in range(3)]
    assert draws[0] == draws[1] == draws[2]
    seq = Sampler(temperature=1.5, top_k=0, top_p=1.0, seed=3)
    picks = {seq(logits, []) for _ in range(200)}
    assert picks == {0, 1, 2, 3}  # one generator per job, not re-seeded per token


def test_top_k_and_top_p_restrict_choices():
    logits = np.array([5.0, 4.0, -10.0, -10.0], dtype=np.float32)
    s = Sampler(temperature=1.0, top_k=2, top_p=1.0, repetition_penalty=1.0, seed=1)
    assert {s(logits, []) for _ in range(100)} <= {0, 1}
    s = Sampler(temperature=1.0, top_k=0, top_p=0.5, repetition_penalty=1.0, seed=1)
    assert {s(logits, []) for _ in range(100)} == {0}


def test_repetition_penalty_discourages_recent_tokens():
    logits = np.array([2.0, 1.9], dtype=np.float32)
    assert Sampler(temperature=0, repetition_penalty=1.5)(logits, [0]) == 1
    assert logits[0] == 2.0  # the backend's buffer is never modified
