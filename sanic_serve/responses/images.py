"""The images of a response's context: where each one is in the request (for the 400 that names it),
whether the model takes images at all, and the images loaded and checked (``sanic_serve.media``).

Images from earlier turns of a chain come back from the store as they were sent (the part's URL or
data URL; see docs/design.md, "Stored responses"), so they are loaded again, under today's policy,
each time a later turn reads them; an error about one of them names ``previous_response_id``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from model_host.ipc.messages import ImageInput
from model_host.ipc.model_kind import ModelKind
from sanic_serve.errors import InvalidRequest
from sanic_serve.media import MediaPolicy, load_image
from sanic_serve.models import ModelBundle
from sanic_serve.responses.items import PreparedContext


@dataclass(frozen=True)
class ImageRef:
    url: str
    param: str  # ``input[0].content[1]``, or ``previous_response_id`` for one of an earlier turn


def image_refs(context: PreparedContext) -> list[ImageRef]:
    """The context's ``input_image`` parts, oldest first (the order the chat template shows them)."""
    first_input = len(context.items) - len(context.input_items)
    refs: list[ImageRef] = []
    for n, item in enumerate(context.items):
        content = item.get("content") if item.get("type") == "message" else None
        for j, part in enumerate(content if isinstance(content, list) else []):
            if isinstance(part, dict) and part.get("type") == "input_image":
                where = (
                    f"input[{n - first_input}].content[{j}]" if n >= first_input else "previous_response_id"
                )
                refs.append(ImageRef(str(part["image_url"]), where))
    return refs


async def context_images(
    bundle: ModelBundle, context: PreparedContext, policy: MediaPolicy
) -> tuple[ImageInput, ...]:
    """The context's images, loaded; a 400 naming the first one when the model takes no images,
    when there are more than ``--max-images-per-request``, or when one cannot be used (413 when it is
    over the byte limit)."""
    refs = image_refs(context)
    if not refs:
        return ()
    if bundle.kind is not ModelKind.VISION:
        raise InvalidRequest(
            f"The model `{bundle.id}` takes no images: content parts must be text.",
            param=refs[0].param,
            code="unsupported_content_type",
        )
    policy.check_count(len(refs), "input")
    loaded = await asyncio.gather(
        *(load_image(ref.url, _image_param(ref.param), policy) for ref in refs), return_exceptions=True
    )
    for result in loaded:  # the first refused image in the request's order is the one named
        if isinstance(result, BaseException):
            raise result
    return tuple(r for r in loaded if isinstance(r, ImageInput))


def _image_param(param: str) -> str:
    return param if param == "previous_response_id" else f"{param}.image_url"
