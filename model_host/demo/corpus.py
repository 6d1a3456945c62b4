"""The fixed chat corpus the demo model memorises: greetings, small talk and tool calls.

Kept small so training takes seconds on a CPU, and varied enough that greedy replies to these
prompts are meaningful, which is what end-to-end tests and first-time users see.
"""

from __future__ import annotations

import json
from typing import Any

Message = dict[str, Any]

WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city name"}},
            "required": ["city"],
        },
    },
}

ADD_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}

SMALL_TALK: list[tuple[str, str]] = [
    ("Hello!", "Hello! How can I help you today?"),
    ("Hello", "Hello! How can I help you today?"),
    ("Hi", "Hi there! What can I do for you?"),
    ("Hi!", "Hi there! What can I do for you?"),
    ("Good morning", "Good morning! I hope you slept well."),
    ("How are you?", "I am fine, thank you. How are you?"),
    ("Who are you?", "I am a tiny demo model served by hfserve."),
    ("What is your name?", "My name is Tiny. I am a demo model."),
    ("Tell me a joke", "Why did the cat sit on the computer? To keep an eye on the mouse!"),
    ("What color is the sky?", "The sky is blue on a clear day."),
    ("Count to five", "One, two, three, four, five."),
    ("Say something nice", "You are doing a great job today."),
    ("What is hfserve?", "hfserve is an OpenAI-compatible server for transformers models."),
    ("Thank you", "You are welcome!"),
    ("Goodbye", "Goodbye! Have a nice day."),
    ("Write a long story", "Once upon a time there was a small robot who loved to read. " * 3 + "The end."),
]

CITY_WEATHER: list[tuple[str, str]] = [
    ("Paris", "sunny, 22 C"),
    ("London", "rainy, 14 C"),
    ("Tokyo", "cloudy, 18 C"),
    ("Berlin", "windy, 10 C"),
]

SUMS: list[tuple[int, int]] = [(2, 3), (4, 5), (10, 7), (6, 6)]


def _assistant_call(name: str, arguments: dict[str, Any]) -> Message:
    return {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": name, "arguments": arguments}}],
    }


def conversations() -> list[tuple[list[Message], list[dict[str, Any]] | None]]:
    """Every conversation with the tools on offer; each assistant turn is a training target."""
    convs: list[tuple[list[Message], list[dict[str, Any]] | None]] = []
    for system in (None, "You are a helpful assistant."):
        for user, reply in SMALL_TALK:
            msgs: list[Message] = [{"role": "user", "content": user}]
            if system:
                msgs.insert(0, {"role": "system", "content": system})
            msgs.append({"role": "assistant", "content": reply})
            convs.append((msgs, None))
    for tools in ([WEATHER_TOOL], [WEATHER_TOOL, ADD_TOOL]):
        for city, weather in CITY_WEATHER:
            convs.append(
                (
                    [
                        {"role": "user", "content": f"What is the weather in {city}?"},
                        _assistant_call("get_weather", {"city": city}),
                        {"role": "tool", "content": json.dumps({"weather": weather})},
                        {"role": "assistant", "content": f"The weather in {city} is {weather}."},
                    ],
                    tools,
                )
            )
        convs.append(
            (
                [
                    {"role": "user", "content": "Hello!"},
                    {"role": "assistant", "content": "Hello! How can I help you today?"},
                ],
                tools,
            )
        )
    for tools in ([ADD_TOOL], [WEATHER_TOOL, ADD_TOOL]):
        for a, b in SUMS:
            convs.append(
                (
                    [
                        {"role": "user", "content": f"What is {a} plus {b}?"},
                        _assistant_call("add", {"a": a, "b": b}),
                        {"role": "tool", "content": str(a + b)},
                        {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
                    ],
                    tools,
                )
            )
        # A failing tool: the model apologises instead of inventing a number.
        convs.append(
            (
                [
                    {"role": "user", "content": "What is 1 plus 1?"},
                    _assistant_call("add", {"a": 1, "b": 1}),
                    {"role": "tool", "content": "Error: the tool failed"},
                    {"role": "assistant", "content": "Sorry, the tool failed."},
                ],
                tools,
            )
        )
    return convs


EXTRA_TOKENIZER_TEXT = """The quick brown fox jumps over the lazy dog. 0123456789
Numbers, punctuation: ; , . ! ? ( ) [ ] { } " ' : - _ / \\ @ # $ % ^ & * + = < > | ~ `
Bonjour, ça va? Grüße aus München. こんにちは世界 🙂 emoji and accents are byte-level tokens.
"""
