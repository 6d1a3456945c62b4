"""One response as a stream of events: the turn loop, and its seam for server-side tools.

THE INTERFACE the POST route, background runs and server-side tools share::

    response_events(req, context, app_ctx, *, response_id, created_at, server_tools=None)
        -> AsyncGenerator[dict, None]

- ``req``: the parsed ``ResponsesRequest`` (``sanic_serve.responses.request.parse_responses_request``).
- ``context``: the ``PreparedContext`` (``sanic_serve.responses.items.prepare_context(req, store)``):
  the stored chain behind ``previous_response_id`` and this request's input items, ids assigned,
  ``item_reference`` resolved; ``context.input_items`` is what ``ResponseStore.save`` stores as this
  request's input.
- ``app_ctx``: the worker's ``app.ctx`` (``client``, ``models``, ``config``, and ``responses``, the
  store, when there is one).
- ``response_id`` / ``created_at``: ``new_response_id()`` and ``int(time.time())`` unless the caller
  already handed them out (a background response is returned as ``queued`` before it runs).
- ``server_tools``: the tools the server runs itself (MCP; the seam: ``responses.server_tools``);
  None picks ``server_tools_for(req, app_ctx)``.

It yields spec-valid ``ResponseStreamEvent`` dicts, ``sequence_number`` 0, 1, 2, ...: first
``response.created`` and ``response.in_progress``, last exactly one terminal event
(``response.completed``, ``response.incomplete``, or ``error`` then ``response.failed``) whose
``response`` is the full final Response body. A request that cannot start at all (unknown model,
prompt over the context, queue full) raises ``APIError`` before the first event, so an HTTP caller can
still answer with its status. Closing the generator (``aclose()``, a cancelled task) aborts the
generation in the model host at once.

Non-stream: drain it and return the terminal event's ``response``. Stream: each event as SSE.
Background: drained into the store.

Turns: the model generates; its calls of request ``function`` tools become ``function_call`` items
(client-side: the response ends after that turn); calls of server tools go to
``ServerTools.run_calls``, whose items (``mcp_call`` with its output, ``mcp_approval_request``) become
context of the next turn, generated in the same response, up to ``max_tool_calls``.

Limits, and how a response says it hit one (nothing the model asked for is dropped unseen):
- ``max_tool_calls``: OpenAI's docs say further calls are "ignored"; here each call past it is an
  ``mcp_call`` with ``status: "failed"`` and an error saying it was not run (nothing reaches the
  server), and the next turn, which reads those errors, may call nothing more (``tool_choice``
  ``none``), so the model answers with what it has. The response completes.
- ``max_output_tokens`` spent: ``incomplete``, ``incomplete_details.reason: "max_output_tokens"``;
  server calls of a turn cut off so are failed ``mcp_call`` items too.
- A later turn (after tool calls) whose prompt no longer fits the context: ``incomplete`` with the
  output so far, ``incomplete_details: {}`` (the spec's two reasons name neither) and ``error``
  (``code: "invalid_prompt"``) saying so. The first turn's prompt not fitting is a 400 as in chat.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from model_host.ipc.messages import ImageInput
from sanic_serve.errors import APIError, InvalidRequest, Overloaded
from sanic_serve.generation_config import config_temperature
from sanic_serve.models import ModelBundle
from sanic_serve.responses.events import ResponseBuilder, TurnWriter, response_body, usage_body
from sanic_serve.responses.images import context_images
from sanic_serve.responses.items import PreparedContext, new_item_id, to_messages
from sanic_serve.responses.request import ResponsesRequest
from sanic_serve.responses.server_tools import Emitter, ServerTools, server_tools_for
from sanic_serve.responses.turn import Turn, admit, allowed, plan_turn

log = logging.getLogger(__name__)


def new_response_id() -> str:
    return f"resp_{uuid.uuid4().hex}"


async def response_events(
    req: ResponsesRequest,
    context: PreparedContext,
    app_ctx: Any,
    *,
    response_id: str | None = None,
    created_at: int | None = None,
    server_tools: ServerTools | None = None,
) -> AsyncGenerator[dict[str, Any], None]:
    bundle = await admit(app_ctx, req.model)
    # Images are loaded once, before the first event: a refused one is the response's 400, and every
    # turn of a tool loop reads the same ones (no output item holds an image).
    images = await context_images(bundle, context, app_ctx.config.media)
    tools = server_tools if server_tools is not None else server_tools_for(req, app_ctx)
    functions = allowed(req, req.function_tools())
    # The first turn as the request alone makes it: whatever makes it a 400 (a prompt over the
    # context, a template that refuses the input, a schema the decoder cannot enforce) is raised
    # here, before the first event.
    first_choice = "auto" if _is_mcp_choice(req.tool_choice) else req.tool_choice
    planned: Turn | None = await plan_turn(
        app_ctx,
        bundle,
        req,
        to_messages(context.items, context.instructions),
        functions,
        first_choice,
        [],
        req.max_output_tokens,
        images,
    )
    body = response_body(
        req,
        response_id or new_response_id(),
        created_at if created_at is not None else int(time.time()),
        "in_progress",
        temperature=config_temperature(req, bundle),
        top_p=req.top_p if req.top_p is not None else bundle.default_top_p,
    )
    run = _Run(req, context, app_ctx, bundle, tools, ResponseBuilder(body), images)
    yield run.builder.event("response.created", response=run.builder.snapshot("in_progress"))
    yield run.builder.event("response.in_progress", response=run.builder.snapshot("in_progress"))
    try:
        async for event in run.turns(planned, functions):
            yield event
    except APIError as exc:
        async for event in run.failed(exc.message, exc.code, exc.param, _error_code(exc)):
            yield event
        return
    except Exception as exc:  # a fault of ours: the client gets plain words and a reference
        ref = f"resp_err_{uuid.uuid4().hex[:12]}"
        log.error("response %s failed (reference %s)", body["id"], ref, exc_info=exc)
        async for event in run.failed(f"The response failed (reference {ref}).", "server_error", None):
            yield event
        return
    yield run.terminal()


def _is_mcp_choice(choice: str | dict[str, Any]) -> bool:
    return isinstance(choice, dict) and choice.get("type") == "mcp"


def _error_code(exc: APIError) -> str:
    """``ResponseError.code`` takes a fixed set of values."""
    if isinstance(exc, Overloaded):
        return "rate_limit_exceeded"
    return "invalid_prompt" if isinstance(exc, InvalidRequest) else "server_error"


class _Emitter:
    """Server tools' items and events, numbered as they come and sent while the tools work."""

    def __init__(self, builder: ResponseBuilder) -> None:
        self._b = builder
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.emitted: set[str] = set()

    def add(self, item: dict[str, Any]) -> int:
        index, event = self._b.add(item)
        self.emitted.add(str(item.get("id")))
        self.queue.put_nowait(event)
        return index

    def event(self, event: dict[str, Any]) -> None:
        self.queue.put_nowait(self._b.numbered(event))

    def done(self, output_index: int, item: dict[str, Any]) -> None:
        self.queue.put_nowait(self._b.done(output_index, item))


class _Run:
    def __init__(
        self,
        req: ResponsesRequest,
        context: PreparedContext,
        app_ctx: Any,
        bundle: ModelBundle,
        tools: ServerTools,
        builder: ResponseBuilder,
        images: tuple[ImageInput, ...] = (),
    ) -> None:
        self.req, self.context, self.app_ctx, self.bundle = req, context, app_ctx, bundle
        self.images = images
        self.tools = tools
        self.builder = builder
        self.input_tokens = self.cached_tokens = self.output_tokens = self.reasoning_tokens = 0
        self.incomplete = False
        self.incomplete_reason: str | None = "max_output_tokens"
        self.incomplete_error: dict[str, Any] | None = None

    def usage(self) -> dict[str, Any]:
        return usage_body(self.input_tokens, self.cached_tokens, self.output_tokens, self.reasoning_tokens)

    def terminal(self) -> dict[str, Any]:
        if self.incomplete:
            final = self.builder.final(
                "incomplete",
                self.usage(),
                incomplete_reason=self.incomplete_reason,
                error=self.incomplete_error,
            )
            return self.builder.event("response.incomplete", response=final)
        return self.builder.event(
            "response.completed", response=self.builder.final("completed", self.usage())
        )

    async def failed(
        self, message: str, code: str | None, param: str | None, response_code: str = "server_error"
    ) -> AsyncIterator[dict[str, Any]]:
        yield self.builder.event("error", code=code, message=message, param=param)
        error = {"code": response_code, "message": message}
        yield self.builder.event(
            "response.failed", response=self.builder.final("failed", self.usage(), error=error)
        )

    async def _drive(self, work: Any, result: list[Any]) -> AsyncIterator[dict[str, Any]]:
        """Run a server-tools coroutine, sending the events it emits as they come; its result
        goes in ``result``, and its items that were not emitted yet follow it."""
        emitter = _Emitter(self.builder)
        task = asyncio.ensure_future(work(emitter))
        try:
            while not (task.done() and emitter.queue.empty()):
                getter = asyncio.ensure_future(emitter.queue.get())
                await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                else:
                    getter.cancel()
            items, extra = task.result()
        finally:
            task.cancel()  # the response was closed while the tools worked
        for item in items:
            if str(item.get("id")) not in emitter.emitted:
                index, added = self.builder.add(item)
                yield added
                yield self.builder.done(index, item)
        result.append(extra)

    async def turns(
        self, planned: Turn | None, functions: list[dict[str, Any]]
    ) -> AsyncIterator[dict[str, Any]]:
        prepared: list[Any] = []
        context = self.context.items
        async for event in self._drive(lambda emit: self.tools.prepare(context, emit), prepared):
            yield event
        extra_functions: list[dict[str, Any]] = prepared[0]
        if extra_functions or self.builder.output:
            planned = None  # the first turn sees more than the request alone showed
        offered = functions + allowed(self.req, extra_functions, self.tools.choice_functions)
        calls_made, first = 0, True
        while True:
            if planned is None:
                choice = self.req.tool_choice if first else "auto"
                if calls_made >= self.req.tool_call_limit:
                    choice = "none"  # no more calls: the model answers with what it has
                names = (
                    self.tools.choice_functions(choice)
                    if isinstance(choice, dict) and _is_mcp_choice(choice)
                    else []
                )
                budget = self._budget()
                if budget is not None and budget <= 0:
                    self.incomplete = True
                    return
                messages = to_messages([*context, *self.builder.output], self.context.instructions)
                try:
                    planned = await plan_turn(
                        self.app_ctx,
                        self.bundle,
                        self.req,
                        messages,
                        offered,
                        choice,
                        names,
                        budget,
                        self.images,
                    )
                except InvalidRequest as exc:
                    if exc.code != "context_length_exceeded" or first:
                        raise
                    self._out_of_context(exc.message)
                    return
            turn, planned, first = planned, None, False
            server_calls: list[dict[str, Any]] = []
            async for event in self._generate(turn, server_calls):
                yield event
            # Calls past max_tool_calls are not run: each leaves a failed mcp_call saying so (after
            # the calls that ran, in the model's order), which the next turn, allowed no more calls,
            # reads.
            room = max(0, self.req.tool_call_limit - calls_made)
            server_calls, over = server_calls[:room], server_calls[room:]
            if self.incomplete or not server_calls:
                if self.incomplete:  # the turn was cut off: none of its calls runs
                    server_calls, over = [], server_calls + over
                async for event in self._drive(lambda emit, calls=over: self._refuse(calls, emit), []):
                    yield event
                return
            ran: list[Any] = []
            async for event in self._drive(
                lambda emit, calls=server_calls: self.tools.run_calls(calls, emit), ran
            ):
                yield event
            async for event in self._drive(lambda emit, calls=over: self._refuse(calls, emit), []):
                yield event
            calls_made += len(server_calls)
            if not ran[0] or any(i.get("type") == "function_call" for i in self.builder.output):
                return  # waiting for approval, or for the client's own function results

    async def _refuse(self, calls: list[dict[str, Any]], emit: Emitter) -> tuple[list[dict[str, Any]], None]:
        if not calls:
            return [], None
        if self.incomplete:
            why = "Not run: the turn that asked for it was cut off at its token limit."
        else:
            why = (
                f"Not run: this response already made max_tool_calls ({self.req.tool_call_limit}) tool calls."
            )
        return await self.tools.refuse(calls, why, emit), None

    def _out_of_context(self, message: str) -> None:
        """A later turn (after tool calls) no longer fits the model's context: the response ends
        ``incomplete`` with what it has. The spec's reasons (``max_output_tokens``,
        ``content_filter``) name neither, so there is none, and ``error`` says what happened."""
        self.incomplete, self.incomplete_reason = True, None
        self.incomplete_error = {
            "code": "invalid_prompt",
            "message": f"The response stopped after its tool calls: the next turn no longer fits. {message}",
        }

    def _budget(self) -> int | None:
        if self.req.max_output_tokens is None:
            return None
        return self.req.max_output_tokens - self.output_tokens

    async def _generate(
        self, turn: Turn, server_calls: list[dict[str, Any]]
    ) -> AsyncIterator[dict[str, Any]]:
        writer = TurnWriter(self.builder)
        gen = turn.generation
        pending: list[dict[str, Any]] = []  # logprobs of text the parser still holds back
        try:
            async for delta in gen.deltas():
                last = delta.finish_reason is not None
                parsed = turn.output.feed_last(delta.text) if last else turn.output.feed(delta.text)
                pending += delta.logprobs or []
                events = writer.reasoning(parsed.reasoning)
                if parsed.content:
                    events += writer.content(parsed.content, pending)
                    pending = []
                elif parsed.reasoning or parsed.calls:
                    pending = []  # those tokens were thought or call markup, not text
                for call in parsed.calls:
                    if self.tools.owns(call.name):
                        server_calls.append(
                            {
                                "type": "function_call",
                                "id": new_item_id("function_call"),
                                "call_id": call.id,
                                "name": call.name,
                                "arguments": call.arguments,
                            }
                        )
                    else:
                        namespace, name = self.req.function_origin(call.name)
                        events += writer.function_call(call.id, name, call.arguments, namespace)
                for event in events:
                    yield event
        except APIError:
            # The host failed mid-turn: what was written stays, closed as incomplete, before the
            # error and response.failed that follow.
            for event in writer.close("incomplete"):
                yield event
            raise
        finally:
            gen.abort()  # closed early (client gone, cancelled): the host stops at once
        self.incomplete = gen.finish_reason == "length"
        for event in writer.close("incomplete" if self.incomplete else "completed"):
            yield event
        self.input_tokens += gen.prompt_tokens
        self.cached_tokens += gen.cached_tokens
        self.output_tokens += gen.completion_tokens
        if writer.reasoning_text:
            thought = len(self.bundle.encode(writer.reasoning_text))
            self.reasoning_tokens += min(thought, gen.completion_tokens)
