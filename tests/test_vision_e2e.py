"""Images in chat end to end: one real ``hfserve start`` serving the tiny Qwen2-VL-style and
LLaVA-style models (``tests/vision_models.py``, loaded on first use by folder) beside the demo model,
requests through the OpenAI SDK, and every reply compared token for token with a lone greedy
``generate()`` in this process on the same processor inputs (the processor's own
``apply_chat_template`` over the same messages, with the images as the client sent them).

The server's reply is read through its logprobs: one entry per generated token (the end-of-turn
token aside) with the text that token added, compared with the same detokenizer's pieces for the
reference's tokens; a tool-call parse of a random model's output cannot hide a difference.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from openai import BadRequestError, OpenAI
from tokenizers import Tokenizer

from model_host.vision_lm import load_processor
from sanic_serve.text import IncrementalDetokenizer
from tests.server import ServerProcess
from tests.vision_models import FAMILIES, Picture, build_vision_model

MAX_TOKENS = 8
TIMEOUT_S = 120


Turn = tuple[str, str, list[Picture]]  # role, text, the turn's images (before its text)


def openai_messages(turns: list[Turn]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for role, text, pictures in turns:
        if not pictures:
            out.append({"role": role, "content": text})
            continue
        parts: list[dict[str, Any]] = [
            {"type": "image_url", "image_url": {"url": p.url(), "detail": "auto"}} for p in pictures
        ]
        out.append({"role": role, "content": [*parts, {"type": "text", "text": text}]})
    return out


def hf_messages(turns: list[Turn]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for role, text, pictures in turns:
        parts = [{"type": "image", "image": p.pil()} for p in pictures]
        out.append({"role": role, "content": [*parts, {"type": "text", "text": text}]})
    return out


@dataclass
class Expected:
    tokens: list[int]  # greedy, the end-of-turn token included when it came
    pieces: list[str]  # each token's text as the server's detokenizer shows it (the logprob entries)
    prompt_tokens: int
    image_at: int  # index of the prompt's first image token (-1: none)


class Reference:
    """Lone greedy ``generate()`` of a tiny model, on the processor's inputs for the messages."""

    def __init__(self, folder: Path) -> None:
        from transformers import AutoModelForImageTextToText

        self.processor = load_processor(str(folder), False)
        self.model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.image_token_id = int(self.model.config.image_token_id)

    def expect(self, turns: list[Turn]) -> Expected:
        inputs = self.processor.apply_chat_template(
            hf_messages(turns),
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
        )
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
        prompt = inputs["input_ids"][0].tolist()
        tokens = out[0, len(prompt) :].tolist()
        eos = self.model.generation_config.eos_token_id
        detok = IncrementalDetokenizer(self.tokenizer)
        pieces = [detok.feed([t]) for t in (tokens[:-1] if tokens and tokens[-1] == eos else tokens)]
        tail = detok.finish()  # bytes held at the end: the server adds them to the last entry
        if tail and pieces:
            pieces[-1] += tail
        image_at = prompt.index(self.image_token_id) if self.image_token_id in prompt else -1
        return Expected(tokens, pieces, len(prompt), image_at)


@pytest.fixture(scope="module")
def folders(cache_dir: Path) -> dict[str, Path]:
    return {family: build_vision_model(cache_dir, family) for family in FAMILIES}


@pytest.fixture(scope="module")
def references(folders: dict[str, Path]) -> dict[str, Reference]:
    return {family: Reference(folder) for family, folder in folders.items()}


@pytest.fixture(scope="module")
def vision_server(cache_dir: Path, folders: dict[str, Path]) -> Iterator[ServerProcess]:
    with ServerProcess.start(cache_dir, workers=2, args=("--max-images-per-request", "3")) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(vision_server: ServerProcess) -> OpenAI:
    return OpenAI(base_url=f"{vision_server.base_url}/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0)


@dataclass
class Reply:
    pieces: list[str]  # the logprob entries' texts: one per token
    completion_tokens: int
    prompt_tokens: int
    cached_tokens: int


def chat(client: OpenAI, model: Path, turns: list[Turn], stream: bool) -> Reply:
    common: dict[str, Any] = {
        "model": str(model),
        "messages": openai_messages(turns),
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "logprobs": True,
    }
    pieces: list[str] = []
    if not stream:
        done = client.chat.completions.create(**common)
        assert done.usage is not None and done.choices[0].logprobs is not None
        pieces = [e.token for e in done.choices[0].logprobs.content or []]
        usage = done.usage
    else:
        chunks = list(
            client.chat.completions.create(**common, stream=True, stream_options={"include_usage": True})
        )
        for chunk in chunks:
            if chunk.choices and chunk.choices[0].logprobs is not None:
                pieces += [e.token for e in chunk.choices[0].logprobs.content or []]
        found = chunks[-1].usage
        assert found is not None
        usage = found
    details = usage.prompt_tokens_details
    cached = details.cached_tokens or 0 if details is not None else 0
    return Reply(pieces, usage.completion_tokens, usage.prompt_tokens, cached)


def assert_same(reply: Reply, expected: Expected) -> None:
    assert reply.completion_tokens == len(expected.tokens), (reply, expected)
    assert reply.pieces == expected.pieces, (reply, expected)
    assert reply.prompt_tokens == expected.prompt_tokens  # the image tokens counted


# Eight requests of mixed shapes: one image, two, none; sizes and formats differ.
CASES: list[tuple[list[Picture], bool]] = [
    ([Picture.noise(448, 448, 1)], False),
    ([Picture.noise(320, 200, 2, "JPEG"), Picture.noise(200, 360, 3)], True),
    ([], False),
    ([Picture.noise(640, 480, 4, "JPEG")], True),
    ([Picture.noise(448, 448, 5), Picture.noise(100, 100, 6, "WEBP")], False),
    ([], True),
    ([Picture.noise(256, 512, 7, "GIF")], False),
    ([Picture.noise(300, 300, 8, "WEBP")], True),
]


@pytest.mark.parametrize("family", FAMILIES)
def test_concurrent_requests_equal_lone_generate(
    client: OpenAI, folders: dict[str, Path], references: dict[str, Reference], family: str
) -> None:
    turns = [[("user", f"What is in picture {i}?", pictures)] for i, (pictures, _) in enumerate(CASES)]
    with ThreadPoolExecutor(len(CASES)) as pool:
        replies = list(
            pool.map(lambda i: chat(client, folders[family], turns[i], CASES[i][1]), range(len(CASES)))
        )
    for i, reply in enumerate(replies):
        assert_same(reply, references[family].expect(turns[i]))


@pytest.mark.parametrize("family", FAMILIES)
def test_an_image_in_an_earlier_turn(
    client: OpenAI, folders: dict[str, Path], references: dict[str, Reference], family: str
) -> None:
    turns: list[Turn] = [
        ("user", "Describe this.", [Picture.noise(400, 300, 11)]),
        ("assistant", "A field of coloured dots.", []),
        ("user", "And this one, next to it?", [Picture.noise(200, 200, 12, "JPEG")]),
        ("assistant", "Smaller dots.", []),
        ("user", "Which one is brighter?", []),
    ]
    assert_same(chat(client, folders[family], turns, stream=False), references[family].expect(turns))


def test_the_prefix_cache_tells_images_apart(
    client: OpenAI, folders: dict[str, Path], references: dict[str, Reference]
) -> None:
    model, reference = folders["qwen2-vl"], references["qwen2-vl"]
    system = ("system", "You describe pictures in a few words, and you say when you are not sure.", [])

    def turns(picture: Picture) -> list[Turn]:
        return [system, ("user", "What is this?", [picture])]

    first, other = Picture.noise(448, 448, 21), Picture.noise(448, 448, 22)
    expected_first, expected_other = reference.expect(turns(first)), reference.expect(turns(other))
    assert expected_first.image_at >= 16  # a prefix long enough to be cached comes before the image
    assert_same(chat(client, model, turns(first), stream=False), expected_first)
    # Same text, another image: its own tokens; nothing at or past the image came from the cache.
    again_other = chat(client, model, turns(other), stream=False)
    assert_same(again_other, expected_other)
    assert again_other.cached_tokens <= expected_other.image_at
    # The first image again: the cache holds it, image tokens included.
    again_first = chat(client, model, turns(first), stream=True)
    assert_same(again_first, expected_first)
    assert again_first.cached_tokens == expected_first.prompt_tokens - 1


def test_an_image_to_a_text_model_is_a_400_naming_the_part(client: OpenAI) -> None:
    content = [
        {"type": "text", "text": "Hi"},
        {"type": "image_url", "image_url": {"url": Picture.noise(8, 8, 0).url()}},
    ]
    with pytest.raises(BadRequestError) as info:
        client.chat.completions.create(
            model="hfserve-demo", messages=[{"role": "user", "content": content}], max_tokens=2
        )
    error = info.value.body
    assert isinstance(error, dict)
    assert error["param"] == "messages[0].content[1]"
    assert "takes no images" in error["message"]


def test_images_are_counted_over_the_whole_conversation(client: OpenAI, folders: dict[str, Path]) -> None:
    pictures = [Picture.noise(16, 16, k) for k in range(4)]  # the server takes 3 per request
    turns: list[Turn] = [
        ("user", "One.", pictures[:2]),
        ("assistant", "Ok.", []),
        ("user", "Two.", pictures[2:]),
    ]
    with pytest.raises(BadRequestError) as info:
        client.chat.completions.create(
            model=str(folders["llava"]), messages=openai_messages(turns), max_tokens=2
        )
    error = info.value.body
    assert isinstance(error, dict) and error["code"] == "too_many_images"


def test_structured_output_choices_and_tools_with_an_image(client: OpenAI, folders: dict[str, Path]) -> None:
    messages = openai_messages([("user", "Name the colour.", [Picture.noise(200, 150, 31)])])
    schema = {
        "type": "object",
        "properties": {"colour": {"type": "string", "maxLength": 12}},
        "required": ["colour"],
        "additionalProperties": False,
    }
    shaped = client.chat.completions.create(
        model=str(folders["qwen2-vl"]),
        messages=messages,
        max_tokens=40,
        response_format={"type": "json_schema", "json_schema": {"name": "colour", "schema": schema}},
    )
    assert shaped.choices[0].finish_reason == "stop"
    assert set(json.loads(shaped.choices[0].message.content or "")) == {"colour"}
    tool = {"type": "function", "function": {"name": "paint", "parameters": {"type": "object"}}}
    several = client.chat.completions.create(
        model=str(folders["llava"]),
        messages=messages,
        max_tokens=4,
        n=2,
        seed=7,
        tools=[tool],
    )
    assert [c.index for c in several.choices] == [0, 1]
    assert several.usage is not None and several.usage.completion_tokens == 8
    assert several.usage.prompt_tokens > 64  # the image's tokens counted once


def test_two_greedy_choices_with_an_image_are_the_lone_reply(
    client: OpenAI, folders: dict[str, Path], references: dict[str, Reference]
) -> None:
    turns: list[Turn] = [("user", "What is this?", [Picture.noise(300, 240, 33)])]
    expected = references["qwen2-vl"].expect(turns)
    done = client.chat.completions.create(
        model=str(folders["qwen2-vl"]),
        messages=openai_messages(turns),
        max_tokens=MAX_TOKENS,
        temperature=0,
        logprobs=True,
        n=2,
    )
    assert [c.index for c in done.choices] == [0, 1]
    for choice in done.choices:
        assert choice.logprobs is not None
        assert [e.token for e in choice.logprobs.content or []] == expected.pieces
    assert done.usage is not None and done.usage.prompt_tokens == expected.prompt_tokens
    assert done.usage.completion_tokens == 2 * len(expected.tokens)


def test_tokenize_and_count_tokens_expand_the_images(
    vision_server: ServerProcess, folders: dict[str, Path], references: dict[str, Reference]
) -> None:
    """Only the host's processor knows how many tokens an image becomes: ``/tokenize`` answers the
    ids the model reads and Messages' ``count_tokens`` their number, what a reply's usage bills."""
    picture = Picture.noise(320, 200, 34, "JPEG")
    turns: list[Turn] = [("user", "What is this?", [picture])]
    reference = references["qwen2-vl"]
    expected = reference.processor.apply_chat_template(
        hf_messages(turns), add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"][0]
    # 320x200 pixels, scaled to 280x168 under the processor's pixel cap: 10x6 merged patches.
    assert expected.count(reference.image_token_id) == 60
    model, base = str(folders["qwen2-vl"]), vision_server.base_url
    body = {"model": model, "messages": openai_messages(turns), "return_token_strs": True}
    tokenized = httpx.post(f"{base}/tokenize", json=body, timeout=TIMEOUT_S)
    assert tokenized.status_code == 200, tokenized.text
    assert tokenized.json()["tokens"] == expected and tokenized.json()["count"] == len(expected)
    assert tokenized.json()["token_strs"].count("<|image_pad|>") == 60
    refused = httpx.post(f"{base}/tokenize", json={**body, "add_special_tokens": True}, timeout=TIMEOUT_S)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "add_special_tokens"
    source = {"type": "base64", "media_type": picture.mime, "data": picture.url().split(",", 1)[1]}
    content = [{"type": "image", "source": source}, {"type": "text", "text": "What is this?"}]
    anthropic = {"model": model, "messages": [{"role": "user", "content": content}]}
    counted = httpx.post(f"{base}/v1/messages/count_tokens", json=anthropic, timeout=TIMEOUT_S)
    assert counted.status_code == 200, counted.text
    assert counted.json() == {"input_tokens": len(expected)}
    reply = httpx.post(
        f"{base}/v1/messages", json={**anthropic, "max_tokens": 2, "temperature": 0}, timeout=TIMEOUT_S
    )
    assert reply.status_code == 200, reply.text
    usage = reply.json()["usage"]
    assert usage["input_tokens"] + usage["cache_read_input_tokens"] == len(expected)


# The text of a one-image prompt fits with room to spare; its image's 64 tokens nearly fill it.
SMALL_CONTEXT = 96


@pytest.fixture(scope="module")
def small_context(folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Qwen2-VL model with a context of ``SMALL_CONTEXT`` tokens (its rotary positions are
    computed, not stored: the weights do not change)."""
    folder = tmp_path_factory.mktemp("small-context") / "qwen2-vl"
    shutil.copytree(folders["qwen2-vl"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = SMALL_CONTEXT
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_the_context_counts_the_images_tokens(
    client: OpenAI, vision_server: ServerProcess, small_context: Path
) -> None:
    """The worker sees one placeholder per image; the host's expanded prompt is what must fit:
    a reply that reaches the context ends with ``length`` (prompt + completion = the context), and
    a prompt whose images alone overflow it is a 400 ``context_length_exceeded``, streamed or not."""
    eos = Tokenizer.from_file(str(small_context / "tokenizer.json")).token_to_id("<|im_end|>")
    one = openai_messages([("user", "What is this?", [Picture.noise(448, 448, 41)])])
    for max_tokens in (None, 60):  # the server's default budget, and one the text alone leaves room for
        done = client.chat.completions.create(
            model=str(small_context),
            messages=one,
            temperature=0,
            logit_bias={str(eos): -100},  # the reply runs until something stops it
            **({"max_tokens": max_tokens} if max_tokens else {}),
        )
        assert done.choices[0].finish_reason == "length"
        assert done.usage is not None and done.usage.prompt_tokens > 64
        assert done.usage.total_tokens == SMALL_CONTEXT, done.usage
    two = openai_messages(
        [("user", "And these?", [Picture.noise(448, 448, 42), Picture.noise(448, 448, 43)])]
    )
    for stream in (False, True):
        with pytest.raises(BadRequestError) as info:
            client.chat.completions.create(
                model=str(small_context), messages=two, max_tokens=4, stream=stream
            )
        error = info.value.body
        assert isinstance(error, dict) and error["code"] == "context_length_exceeded", error
        assert (
            error["param"] == "messages" and f"maximum context length is {SMALL_CONTEXT}" in error["message"]
        )
    content = [
        {"type": "input_text", "text": "And these?"},
        *({"type": "input_image", "image_url": p.url()} for p in (Picture.noise(448, 448, 44),) * 2),
    ]
    reply = httpx.post(
        f"{vision_server.base_url}/v1/responses",
        json={"model": str(small_context), "input": [{"role": "user", "content": content}]},
        timeout=TIMEOUT_S,
    )
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["code"] == "context_length_exceeded"
    assert reply.json()["error"]["param"] == "input"
    # Counting is not limited by the context: /tokenize says how far over it the prompt is.
    tokenized = httpx.post(
        f"{vision_server.base_url}/tokenize",
        json={"model": str(small_context), "messages": two},
        timeout=TIMEOUT_S,
    )
    assert tokenized.status_code == 200, tokenized.text
    assert tokenized.json()["count"] > 2 * 64 and tokenized.json()["max_model_len"] == SMALL_CONTEXT
