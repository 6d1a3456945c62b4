"""Images in the Responses and Messages requests, without a server: how ``input_image`` parts and
``image`` blocks are checked, stored, turned into chat's ``image_url`` parts, and named in errors."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from model_host.ipc.model_kind import ModelKind
from sanic_serve.errors import APIError, InvalidRequest
from sanic_serve.media import MediaPolicy
from sanic_serve.messages.request import parse_messages_request
from sanic_serve.messages.translate import anthropic_names, to_chat_with_images
from sanic_serve.responses.images import context_images, image_refs
from sanic_serve.responses.items import prepare_context, to_messages
from sanic_serve.responses.request import parse_responses_request
from tests.media_helpers import bomb_png, data_url, image_bytes
from tests.test_responses_units import FakeStore, Turn

PNG = data_url(image_bytes("PNG"))


def request(**fields: Any) -> Any:
    return parse_responses_request({"model": "m", **fields})


def image_message(*parts: dict[str, Any], role: str = "user") -> dict[str, Any]:
    return {"role": role, "content": list(parts)}


class Bundle:
    def __init__(self, kind: ModelKind) -> None:
        self.id, self.kind = "m", kind


def test_input_images_are_kept_as_sent_and_become_chat_image_parts() -> None:
    ctx = prepare_context(
        request(
            input=[
                image_message(
                    {"type": "input_text", "text": "What is this?"},
                    {"type": "input_image", "image_url": PNG, "detail": "low"},
                    {"type": "input_image", "image_url": "https://example.com/cat.png"},
                )
            ]
        ),
        None,
    )
    [item] = ctx.input_items
    assert item["content"][1] == {"type": "input_image", "image_url": PNG, "detail": "low"}
    assert item["content"][2]["detail"] == "auto"
    assert to_messages(ctx.items, None) == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": PNG, "detail": "low"}},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.png", "detail": "auto"}},
            ],
        }
    ]
    assert [(r.param, r.url[:10]) for r in image_refs(ctx)] == [
        ("input[0].content[1]", PNG[:10]),
        ("input[0].content[2]", "https://ex"),
    ]


def test_text_only_messages_stay_strings() -> None:
    ctx = prepare_context(request(input="Hi"), None)
    assert to_messages(ctx.items, None) == [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize(
    ("part", "param"),
    [
        ({"type": "input_image", "file_id": "file-abc"}, "input[0].content[0].file_id"),
        ({"type": "input_image"}, "input[0].content[0].image_url"),
        ({"type": "input_image", "image_url": {"url": "x"}}, "input[0].content[0].image_url"),
        ({"type": "input_image", "image_url": "x", "detail": "ultra"}, "input[0].content[0].detail"),
        ({"type": "input_file", "file_data": "x"}, "input[0].content[0]"),
    ],
)
def test_malformed_image_parts_are_400s_naming_them(part: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        prepare_context(request(input=[image_message(part)]), None)
    assert info.value.param == param


def test_images_belong_to_input_messages_not_assistant_turns_or_instructions() -> None:
    part = {"type": "input_image", "image_url": PNG}
    with pytest.raises(InvalidRequest) as info:
        prepare_context(request(input=[image_message(part, role="assistant")]), None)
    assert info.value.param == "input[0].content[0]"
    with pytest.raises(InvalidRequest) as info:
        prepare_context(request(input="Hi", instructions=[image_message(part, role="developer")]), None)
    assert info.value.param == "instructions[0].content[0]"


def test_an_image_of_an_earlier_turn_is_replayed_and_named_by_the_chain() -> None:
    first_in = [
        {
            "type": "message",
            "id": "msg_a",
            "role": "user",
            "content": [{"type": "input_image", "image_url": PNG, "detail": "auto"}],
        }
    ]
    first_out = [
        {
            "type": "message",
            "id": "msg_b",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "A cat."}],
        }
    ]
    store = FakeStore({"resp_1": [Turn(first_in, first_out, None)]})
    ctx = prepare_context(
        request(
            input=[
                image_message(
                    {"type": "input_text", "text": "And this?"}, {"type": "input_image", "image_url": PNG}
                )
            ],
            previous_response_id="resp_1",
        ),
        store,
    )
    assert [r.param for r in image_refs(ctx)] == ["previous_response_id", "input[0].content[1]"]
    messages = to_messages(ctx.items, None)
    assert messages[0]["content"][0]["type"] == "image_url" and messages[1]["role"] == "assistant"
    images = asyncio.run(context_images(Bundle(ModelKind.VISION), ctx, MediaPolicy()))  # type: ignore[arg-type]
    assert len(images) == 2 and images[0].digest == images[1].digest


def test_context_images_refuse_before_reading_anything() -> None:
    ctx = prepare_context(
        request(
            input=[
                image_message(
                    {"type": "input_text", "text": "Hi"},
                    {"type": "input_image", "image_url": "http://127.0.0.1/x.png"},
                )
            ]
        ),
        None,
    )
    with pytest.raises(InvalidRequest) as info:  # a text model: no image is even looked at
        asyncio.run(context_images(Bundle(ModelKind.CAUSAL), ctx, MediaPolicy()))  # type: ignore[arg-type]
    assert (info.value.param, info.value.code) == ("input[0].content[1]", "unsupported_content_type")
    assert "takes no images" in info.value.message
    with pytest.raises(APIError) as err:
        asyncio.run(context_images(Bundle(ModelKind.VISION), ctx, MediaPolicy()))  # type: ignore[arg-type]
    assert (err.value.status, err.value.param) == (400, "input[0].content[1].image_url")
    many = prepare_context(
        request(input=[image_message(*[{"type": "input_image", "image_url": PNG}] * 3)]), None
    )
    with pytest.raises(InvalidRequest) as info:
        asyncio.run(context_images(Bundle(ModelKind.VISION), many, MediaPolicy(max_images_per_request=2)))  # type: ignore[arg-type]
    assert (info.value.param, info.value.code) == ("input", "too_many_images")
    bomb = prepare_context(
        request(
            input=[
                image_message(
                    {"type": "input_image", "image_url": PNG},
                    {"type": "input_image", "image_url": data_url(bomb_png())},
                )
            ]
        ),
        None,
    )
    with pytest.raises(InvalidRequest) as info:
        asyncio.run(context_images(Bundle(ModelKind.VISION), bomb, MediaPolicy()))  # type: ignore[arg-type]
    assert info.value.param == "input[0].content[1].image_url"


# -- Messages --------------------------------------------------------------------------------------
def messages_request(*blocks: dict[str, Any]) -> Any:
    return parse_messages_request(
        {
            "model": "m",
            "max_tokens": 8,
            "system": "Be brief.",
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": list(blocks)},
            ],
        }
    )


def test_image_blocks_become_chat_image_parts_and_errors_name_the_block() -> None:
    b64 = PNG.split(",", 1)[1]
    chat, params = to_chat_with_images(
        messages_request(
            {"type": "text", "text": "Compare"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": b64}},
            {"type": "image", "source": {"type": "url", "url": "https://example.com/a.jpg"}},
        )
    )
    last = chat.messages[3]
    assert last.role == "user" and isinstance(last.content, list)
    dumped = [p.model_dump() for p in last.content]
    assert dumped[0] == {"type": "text", "text": "Compare"}
    assert dumped[1]["image_url"] == {"url": PNG} and dumped[2]["image_url"] == {
        "url": "https://example.com/a.jpg"
    }
    assert params == {
        "messages[3].content[1]": "messages.2.content.1",
        "messages[3].content[2]": "messages.2.content.2",
    }
    renamed = anthropic_names(
        InvalidRequest("The image is not a PNG.", param="messages[3].content[2].image_url"), params
    )
    assert renamed.param == "messages.2.content.2.source" and renamed.message.startswith(
        "messages.2.content.2.source: "
    )
    assert (
        anthropic_names(InvalidRequest("x", param="messages[3].content[1]"), params).param
        == "messages.2.content.1"
    )
    assert anthropic_names(InvalidRequest("x", param="max_tokens"), params).param == "max_tokens"


@pytest.mark.parametrize(
    ("source", "param"),
    [
        (
            {"type": "base64", "media_type": "image/bmp", "data": "AAAA"},
            "messages.2.content.0.source.media_type",
        ),
        ({"type": "base64", "media_type": "image/png"}, "messages.2.content.0.source.data"),
        ({"type": "url"}, "messages.2.content.0.source.url"),
        ({"type": "file", "file_id": "file_1"}, "messages.2.content.0.source"),
        ({"type": "text", "data": "x"}, "messages.2.content.0.source.type"),
    ],
)
def test_malformed_image_sources_are_400s_naming_them(source: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        to_chat_with_images(messages_request({"type": "image", "source": source}))
    assert info.value.param == param and info.value.message.startswith(param)


def test_images_in_assistant_turns_and_tool_results_are_refused() -> None:
    image = {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}
    body = {
        "model": "m",
        "max_tokens": 8,
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": [image]}],
    }
    with pytest.raises(InvalidRequest) as info:
        to_chat_with_images(parse_messages_request(body))
    assert info.value.param == "messages.1.content.0"
    body = {
        "model": "m",
        "max_tokens": 8,
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [image]}]},
        ],
    }
    with pytest.raises(InvalidRequest) as info:
        to_chat_with_images(parse_messages_request(body))
    assert info.value.param == "messages.2.content.0.content.0"
