"""What ``recipes.serve`` accepts on megatron-core's OpenAI-compatible endpoints, checked before
megatron's own handlers run (a Quart blueprint registered beside them), and the shape of every
error it answers: OpenAI's ``{"error": {"message", "type", "param", "code"}}``.

Megatron-core 0.19's handlers answer bad input with plain text (some with 500), read a fixed set
of fields and ignore the rest, clamp a too-large ``max_tokens`` and have no ``stream`` and no
``/v1/models``.  Here:

- a body that is not a JSON object, or larger than ``--max-request-bytes``: 400 / 413;
- a field the handler would not read (``presence_penalty``, ``logit_bias``, a typo, ...): 400
  naming it, never ignored; ``n`` is 1 on completions (megatron's reads no ``n``); ``seed`` only
  with greedy decoding (temperature 0 or top_k 1), where the answer does not depend on it
  (megatron has no per-request seed; lm-eval sends one);
- ``stream: true``: 400 (megatron-core 0.19's endpoints answer once);
- ``model`` other than the served name: 404, as OpenAI and vLLM answer;
- a prompt (plus ``max_tokens``) longer than the context, ``max_tokens`` < 1, a token id outside
  the vocabulary, a temperature < 0, top_p outside (0, 1]: 400;
- chat messages that are not LLaMA-2-chat's turns (an optional system message, then user and
  assistant alternating, ending with a user's): 400;
- whatever megatron's handlers still answer with a 4xx or 5xx: rewrapped in the same shape.

The rules are plain functions of the parsed body (``check_completion``, ``check_chat``); the
blueprint (``blueprint``) needs Quart, which only the server imports.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

COMPLETION_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "stop", "echo", "logprobs",
                     "seed", "stream", "n", "user", "ignore_eos"}
CHAT_FIELDS = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "n",
               "logprobs", "top_logprobs", "seed", "stream", "user", "ignore_eos"}
MAX_N = 16
MAX_TOP_LOGPROBS = 20


class RequestError(Exception):
    """One bad field: its HTTP status, OpenAI error type, message and parameter."""

    def __init__(self, message: str, param: Optional[str] = None, status: int = 400,
                 kind: str = "invalid_request_error", code: Optional[str] = None):
        super().__init__(message)
        self.message, self.param, self.status, self.kind, self.code = message, param, status, kind, code

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass(frozen=True)
class Limits:
    model_name: str
    max_sequence_length: int  # prompt and generated tokens of one request
    vocab_size: int
    prompt_log_probs: bool = False  # the engine keeps every prompt token's logits (echo + logprobs)


def parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(f"the body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise RequestError(f"the body must be a JSON object, not {type(body).__name__}")
    return body


def check_completion(body: dict, limits: Limits, tokenize: Callable[[str], List[int]]) -> None:
    _common(body, limits, COMPLETION_FIELDS)
    if body.get("n", 1) != 1:
        raise RequestError("n must be 1 on /v1/completions here (megatron-core's completions handler answers one "
                           "choice per prompt); send the request n times", "n")
    logprobs = body.get("logprobs")
    if logprobs is not None and (not _is_int(logprobs) or not 0 <= logprobs <= MAX_TOP_LOGPROBS):
        raise RequestError(f"logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}]", "logprobs")
    if "echo" in body and not isinstance(body["echo"], bool):
        raise RequestError("echo must be true or false", "echo")
    if body.get("echo") and logprobs is not None and not limits.prompt_log_probs:
        raise RequestError("echo with logprobs asks for the prompt's log-probs, which this server does not compute: "
                           "start it with --return-log-probs", "echo")
    stop = body.get("stop")
    if stop is not None and not (isinstance(stop, str) or (isinstance(stop, list) and stop and
                                                           all(isinstance(s, str) and s for s in stop))):
        raise RequestError("stop must be a string or a list of non-empty strings", "stop")
    prompts = _prompts(body.get("prompt"), limits, tokenize)
    max_tokens = body.get("max_tokens", 16)  # OpenAI's default, and megatron's handler's
    _check_max_tokens(max_tokens, "max_tokens")
    for n in prompts:
        _check_fits(n, max_tokens, "max_tokens", limits)


def check_chat(body: dict, limits: Limits, chat_tokens: Callable[[list], List[int]]) -> None:
    _common(body, limits, CHAT_FIELDS)
    n = body.get("n", 1)
    if not _is_int(n) or not 1 <= n <= MAX_N:
        raise RequestError(f"n must be an integer in [1, {MAX_N}]", "n")
    if "logprobs" in body and not isinstance(body["logprobs"], bool):
        raise RequestError("logprobs must be true or false on chat completions", "logprobs")
    top = body.get("top_logprobs")
    if top is not None and (not _is_int(top) or not 0 <= top <= MAX_TOP_LOGPROBS or not body.get("logprobs")):
        raise RequestError(f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], with logprobs true",
                           "top_logprobs")
    if "max_tokens" in body and "max_completion_tokens" in body:
        raise RequestError("give max_completion_tokens or max_tokens, not both", "max_completion_tokens")
    param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = body.get(param)
    if max_tokens is not None:
        _check_max_tokens(max_tokens, param)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", "messages")
    try:
        ids = chat_tokens(messages)
    except ValueError as e:
        raise RequestError(str(e), "messages") from None
    _check_fits(len(ids), 1 if max_tokens is None else max_tokens, param, limits)


def _common(body: dict, limits: Limits, fields: set) -> None:
    unknown = sorted(set(body) - fields)
    if unknown:
        raise RequestError(f"unknown or unsupported parameter {unknown[0]!r}: this server reads "
                           f"{', '.join(sorted(fields))}", unknown[0])
    if body.get("stream"):
        raise RequestError("stream is not supported: megatron-core 0.19's endpoints answer once; send stream "
                           "false or leave it out", "stream")
    model = body.get("model")
    if model is not None and model != limits.model_name:
        raise RequestError(f"the model {model!r} does not exist; this server serves {limits.model_name!r}", "model",
                           status=404, code="model_not_found")
    temperature = body.get("temperature", 1.0)
    if not _is_number(temperature) or temperature < 0:
        raise RequestError("temperature must be a number >= 0 (0: greedy)", "temperature")
    top_p = body.get("top_p", 1.0)
    if not _is_number(top_p) or not 0 < top_p <= 1:
        raise RequestError("top_p must be a number in (0, 1]", "top_p")
    top_k = body.get("top_k", 0)
    if not _is_int(top_k) or top_k < 0:
        raise RequestError("top_k must be an integer >= 0 (0: off)", "top_k")
    if "seed" in body:
        if not _is_int(body["seed"]):
            raise RequestError("seed must be an integer", "seed")
        if temperature != 0 and top_k != 1:
            raise RequestError("seed is not supported with sampling: megatron-core's engine has no per-request "
                               "seed (with temperature 0 or top_k 1 the answer does not depend on it)", "seed")
    if "ignore_eos" in body and not isinstance(body["ignore_eos"], bool):
        raise RequestError("ignore_eos must be true or false", "ignore_eos")


def _prompts(prompt, limits: Limits, tokenize) -> List[int]:
    """Each prompt's length in tokens (BOS included, as the handler will send it)."""
    what = "prompt must be a string, a list of strings, a list of token ids or a list of lists of token ids"
    if isinstance(prompt, str):
        return [len(tokenize(prompt))]
    if not isinstance(prompt, list) or not prompt:
        raise RequestError(what if prompt is not None else "prompt is required", "prompt")
    if all(isinstance(p, str) for p in prompt):
        return [len(tokenize(p)) for p in prompt]
    rows = [prompt] if all(_is_int(t) for t in prompt) else prompt
    if not all(isinstance(r, list) and r and all(_is_int(t) for t in r) for r in rows):
        raise RequestError(what, "prompt")
    for r in rows:
        bad = [t for t in r if not 0 <= t < limits.vocab_size]
        if bad:
            raise RequestError(f"token id {bad[0]} is outside the vocabulary (0 to {limits.vocab_size - 1})",
                               "prompt")
    return [len(r) for r in rows]


def _check_max_tokens(value, param: str) -> None:
    if not _is_int(value) or value < 1:
        raise RequestError(f"{param} must be an integer >= 1", param)


def _check_fits(prompt_tokens: int, max_tokens: int, param: str, limits: Limits) -> None:
    if prompt_tokens + max_tokens > limits.max_sequence_length:
        raise RequestError(f"this model's maximum context length is {limits.max_sequence_length} tokens; the "
                           f"prompt has {prompt_tokens} and {param} asks for {max_tokens} more", param,
                           code="context_length_exceeded")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def llama2_chat_messages(messages: Sequence) -> tuple:
    """(system or None, [(user, assistant or None), ...]) from OpenAI chat messages in LLaMA-2-chat's
    order: an optional system message, then user and assistant alternating, ending with a user's."""
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in (
                "system", "user", "assistant"):
            raise ValueError("each message must be an object with role system, user or assistant and a string "
                             "content")
    system = None
    rest = list(messages)
    if rest and rest[0]["role"] == "system":
        system, rest = rest[0]["content"], rest[1:]
    roles = [m["role"] for m in rest]
    if not rest or roles[-1] != "user" or any(r != ("user" if i % 2 == 0 else "assistant")
                                              for i, r in enumerate(roles)):
        raise ValueError("LLaMA-2-chat takes an optional system message, then user and assistant messages "
                         f"alternating, ending with a user's; got {', '.join(m['role'] for m in messages)}")
    turns = [(rest[i]["content"], rest[i + 1]["content"] if i + 1 < len(rest) else None)
             for i in range(0, len(rest), 2)]
    return system, turns


def blueprint(limits: Limits, tokenize, chat_tokens, max_request_bytes: int):
    """The Quart blueprint that puts these rules in front of megatron's handlers, answers
    ``/v1/models`` and reshapes every error."""
    from quart import Blueprint, Response, jsonify, request

    bp = Blueprint("ascend_patches_openai_rules", __name__)
    checks = {"/v1/completions": lambda b: check_completion(b, limits, tokenize),
              "/completions": lambda b: check_completion(b, limits, tokenize),
              "/v1/chat/completions": lambda b: check_chat(b, limits, chat_tokens),
              "/chat/completions": lambda b: check_chat(b, limits, chat_tokens)}

    @bp.record_once
    def _limit_body(state):
        state.app.config["MAX_CONTENT_LENGTH"] = max_request_bytes

    @bp.before_app_request
    async def _check():
        check = checks.get(request.path)
        if check is None or request.method != "POST":
            return None
        if request.content_length is not None and request.content_length > max_request_bytes:
            return _answer(RequestError(f"the body has {request.content_length} bytes; this server takes at most "
                                        f"{max_request_bytes} (--max-request-bytes)", status=413))
        try:
            check(parse_body(await request.get_data()))
        except RequestError as e:
            return _answer(e)
        return None

    def _answer(e: RequestError):
        out = jsonify(e.body())
        out.status_code = e.status
        return out

    @bp.after_app_request
    async def _reshape(response):
        if response.status_code < 400 or response.mimetype == "application/json":
            return response
        if response.mimetype == "text/html":  # Quart's own pages (404, 405, 413): their status line
            text = f"{response.status}: {request.method} {request.path}"
        else:  # megatron's handlers answer plain text
            text = response.get_data(as_text=True)
            text = (await text if inspect.isawaitable(text) else text).strip()
        kind = "server_error" if response.status_code >= 500 else "invalid_request_error"
        return Response(json.dumps(error_body(text or response.status, kind)), status=response.status_code,
                        mimetype="application/json")

    @bp.route("/v1/models", methods=["GET"])
    async def _models():
        return jsonify({"object": "list", "data": [{"id": limits.model_name, "object": "model", "created": 0,
                                                    "owned_by": "ascend-patches",
                                                    "max_model_len": limits.max_sequence_length}]})

    return bp
