"""``logprobs`` / ``top_logprobs`` in chat completions, streamed and not."""

from __future__ import annotations

import math

import openai
import pytest

from model_host.ipc.codec import decode_frame, encode
from model_host.ipc.messages import FinishReason, TokenFrame, TokenLogprob
from tests.server import ServerProcess

MODEL = "hfserve-demo"
JOKE = [{"role": "user", "content": "Tell me a joke"}]


def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0)


def test_frame_round_trip_with_logprobs() -> None:
    frame = TokenFrame(
        3,
        (5, 6),
        FinishReason.NONE,
        None,
        (TokenLogprob(-0.25, ((5, -0.25), (9, -1.5))), TokenLogprob(-3.0, ())),
    )
    assert decode_frame(encode(frame)) == frame


def test_top_logprobs_non_stream(server: ServerProcess) -> None:
    resp = client(server).chat.completions.create(
        model=MODEL, messages=JOKE, temperature=0, logprobs=True, top_logprobs=5
    )
    choice = resp.choices[0]
    content = choice.logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == resp.usage.completion_tokens - 1  # type: ignore[union-attr]
    assert "".join(e.token for e in content) == choice.message.content
    for e in content:
        assert len(e.top_logprobs) == 5
        values = [t.logprob for t in e.top_logprobs]
        assert values == sorted(values, reverse=True)
        # greedy: the sampled token is the most likely one
        assert math.isclose(e.logprob, values[0], abs_tol=1e-5)
        assert e.logprob <= 0 and e.bytes == list(e.token.encode())
    assert math.fsum(math.exp(t.logprob) for t in content[0].top_logprobs) <= 1.0 + 1e-5


def test_logprobs_stream_matches_non_stream(server: ServerProcess) -> None:
    kwargs = dict(model=MODEL, messages=JOKE, temperature=0, logprobs=True, top_logprobs=2)
    whole = client(server).chat.completions.create(**kwargs)  # type: ignore[call-overload]
    chunks = list(client(server).chat.completions.create(stream=True, **kwargs))  # type: ignore[call-overload]
    streamed = [
        e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content or []
    ]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [
        (e.token, round(e.logprob, 4))
        for e in whole.choices[0].logprobs.content  # type: ignore[union-attr]
    ]
    assert all(len(e.top_logprobs) == 2 for e in streamed)


def test_no_logprobs_unless_asked(server: ServerProcess) -> None:
    resp = client(server).chat.completions.create(model=MODEL, messages=JOKE, temperature=0)
    assert resp.choices[0].logprobs is None
    plain = client(server).chat.completions.create(model=MODEL, messages=JOKE, temperature=0, logprobs=True)
    assert all(e.top_logprobs == [] for e in plain.choices[0].logprobs.content)  # type: ignore[union-attr]


def test_top_logprobs_needs_logprobs(server: ServerProcess) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        client(server).chat.completions.create(model=MODEL, messages=JOKE, top_logprobs=3)
    assert exc.value.body["param"] == "top_logprobs"  # type: ignore[index]


def test_stray_bytes_reach_the_content_and_its_logprobs(server: ServerProcess) -> None:
    """A model emitting a byte that starts a character no later token completes (forced here with
    logit_bias) used to stream no text at all; the content is now what a decode of the ids shows,
    and the logprob entries still add up to it, streamed or not."""
    stray = 140  # the demo tokenizer's byte 0xCD: the first byte of a two-byte character
    kwargs = dict(
        model=MODEL,
        messages=JOKE,
        temperature=0,
        max_tokens=6,
        logit_bias={str(stray): 100},
        logprobs=True,
    )
    whole = client(server).chat.completions.create(**kwargs)  # type: ignore[call-overload]
    choice = whole.choices[0]
    assert choice.message.content == "\ufffd" * 6
    assert choice.logprobs is not None and choice.logprobs.content is not None
    assert "".join(e.token for e in choice.logprobs.content) == choice.message.content
    chunks = list(client(server).chat.completions.create(stream=True, **kwargs))  # type: ignore[call-overload]
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == "\ufffd" * 6
