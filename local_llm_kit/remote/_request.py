"""``create()``'s arguments over HTTP: validated as in-process, then turned into the JSON body."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from local_llm_kit.errors import InvalidRequestError
from local_llm_kit.request import ChatRequest, validate_request

if TYPE_CHECKING:
    from local_llm_kit.remote._transport import RemoteEndpoint

__all__ = ["RemoteCall", "create_parameter_names", "prepare_call", "request_body", "split_options"]


def request_body(request: ChatRequest, model: str, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The JSON body for a validated request: what was asked, in OpenAI's field names.

    Sampling defaults of the client (``temperature``, ``top_p``) are sent explicitly, so a
    remote server samples as the in-process client would.
    """
    body: dict[str, Any] = {"model": model, "messages": list(request.messages),
                            "temperature": request.temperature, "top_p": request.top_p}
    if request.stream:
        body["stream"] = True
        if request.include_usage:
            body["stream_options"] = {"include_usage": True}
    optional: dict[str, Any] = {
        "max_tokens": request.max_tokens, "seed": request.seed, "user": request.user,
        "stop": list(request.stop) or None, "n": request.n if request.n != 1 else None,
        "presence_penalty": request.presence_penalty or None, "frequency_penalty": request.frequency_penalty or None,
        "logit_bias": {str(k): v for k, v in request.logit_bias.items()} or None,
        "logprobs": True if request.logprobs else None,
        "top_logprobs": request.top_logprobs if request.logprobs and request.top_logprobs else None,
        "response_format": request.response_format,
        "tools": list(request.tools) if request.tools else None, "tool_choice": request.tool_choice,
        "parallel_tool_calls": request.parallel_tool_calls,
        "functions": list(request.functions) if request.functions else None,
        "function_call": request.function_call,
        # Ours, not OpenAI's: our server honours them; another server decides (vLLM logs and ignores them).
        "prompt_lookup": request.draft_tokens, "repetition_guard": request.repetition_guard or None,
    }
    body.update({name: value for name, value in optional.items() if value is not None})
    for name, value in (extra or {}).items():
        if name in body:
            raise InvalidRequestError(f"extra_body.{name} would replace a validated parameter",
                                      param=f"extra_body.{name}")
        body[name] = value
    return body


def split_options(params: Mapping[str, Any], known: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Separate the HTTP options (``timeout``, ``extra_*``) from the request's parameters.

    ``extra_body`` keys that are parameters of ``create()`` join the others (and are validated);
    the rest go to the server as given, since only the server knows them (vLLM's ``top_k``...), and
    so does ``timeout`` there: by name it is the HTTP timeout, in the body the server's deadline.
    """
    args = dict(params)
    options: dict[str, Any] = {name: args.pop(name) for name in ("timeout", "extra_body", "extra_headers",
                                                                "extra_query") if name in args}
    extra = options.pop("extra_body", None)
    forwarded: dict[str, Any] = {}
    if extra is not None:
        if not isinstance(extra, Mapping):
            raise InvalidRequestError("extra_body must be a dict", param="extra_body")
        for name, value in extra.items():
            if name in known and name != "timeout":  # extra_body.timeout goes in the body, as openai does
                if args.get(name) is not None:
                    raise InvalidRequestError(f"{name} is given both by name and in extra_body",
                                              param=f"extra_body.{name}")
                args[name] = value
            else:
                forwarded[str(name)] = value
    for name in ("extra_headers", "extra_query"):
        value = options.get(name)
        if value is not None and not isinstance(value, Mapping):
            raise InvalidRequestError(f"{name} must be a dict", param=name)
    timeout = options.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
        raise InvalidRequestError(f"timeout must be a positive number of seconds, got {timeout!r}", param="timeout")
    options["extra_body"] = forwarded
    return args, options


def create_parameter_names() -> frozenset[str]:
    """The parameters ``create()`` takes (as the in-process client declares them)."""
    from local_llm_kit.params import CompletionCreateParams

    return frozenset(CompletionCreateParams.__required_keys__ | CompletionCreateParams.__optional_keys__) | {"stream"}


# logit_bias keys are checked against the vocabulary by the server, which knows it.
_ANY_VOCAB = 2**31
# OpenAI parameters a local model cannot honour: a remote server may, so they are forwarded.
_SERVER_ONLY = frozenset({"audio", "modalities", "prediction", "reasoning_effort", "service_tier",
                          "web_search_options", "verbosity", "prompt_cache_key", "safety_identifier",
                          "store", "metadata"})


class RemoteCall:
    """One ``create()`` call: the validated request, its body and its HTTP options."""

    def __init__(self, request: ChatRequest, body: dict[str, Any], options: dict[str, Any],
                 new_messages: list[dict[str, Any]]) -> None:
        self.request = request
        self.body = body
        self.timeout: float | None = options.get("timeout")
        self.headers: Mapping[str, str] | None = options.get("extra_headers")
        self.params: Mapping[str, Any] | None = options.get("extra_query")
        self.new_messages = new_messages

    @property
    def http(self) -> dict[str, Any]:
        """The HTTP options, as :class:`RemoteEndpoint`'s request methods take them."""
        return {"timeout": self.timeout, "headers": self.headers, "params": self.params}


def prepare_call(endpoint: RemoteEndpoint, settings: Any, stream: Any, params: Mapping[str, Any]) -> RemoteCall:
    """Validate ``create()``'s arguments as the in-process client does; build the body."""
    known = create_parameter_names()
    args, options = split_options(params, sorted(known))
    forwarded = dict(options["extra_body"])
    for name in sorted(set(args) - known):
        value = args.pop(name)
        if name not in _SERVER_ONLY:
            raise InvalidRequestError(f"unknown parameter {name!r}", param=name)
        if value is not None:
            forwarded[name] = value  # the server decides whether it honours it
    for name in ("store", "metadata"):  # create() parameters the request itself does not carry
        if args.get(name) is not None:
            forwarded[name] = args.pop(name)  # the server decides (this library's refuses store=True)
    if args.get("messages") is None:
        raise InvalidRequestError("messages is required", param="messages")
    args["stream"] = stream
    request = validate_request(args, default_temperature=settings.temperature, default_top_p=settings.top_p,
                               n_vocab=_ANY_VOCAB)
    body = request_body(request, request.model or endpoint.model, forwarded)
    return RemoteCall(request, body, options, list(request.messages))


