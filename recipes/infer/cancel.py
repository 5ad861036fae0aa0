"""A request whose client goes away is cancelled and its KV blocks freed.

Megatron-core 0.19's client -> coordinator -> engine protocol has no cancel message: a request
whose HTTP client disconnected ran to its ``max_tokens`` and held its blocks until then.  This
adds one the way megatron's protocol is built to grow (``headers.HEADER_ENUMS`` takes a category
of its own; the coordinator's ``handlers.HANDLERS`` registry takes a handler):

- the header ``CANCEL_REQUEST`` (wire value 100), in a category of its own;
- the HTTP process: when the future of a request is cancelled (Quart cancels a handler whose
  client disconnected, and that cancels the futures it awaits), megatron's ``InferenceClient``
  sends ``[CANCEL_REQUEST, its request id]``;
- the coordinator maps (that client, its request id) to its own id and forwards
  ``[CANCEL_REQUEST, id]`` to the engine holding the request; one already answered is let be;
- the engine (every TP rank receives the same messages in the same step) finishes the request
  at the next step's bookkeeping, by the path a stop word takes, which hands its blocks back to
  the allocator; a request still waiting is finished at its first step.  It is answered with the
  tokens it had, to a client that is gone.

``install()`` patches the three, once per process; the coordinator runs in a process megatron
spawns, so its entry point is replaced by one that installs first.
"""

from __future__ import annotations

import collections
from enum import IntEnum

CANCEL_WIRE_VALUE = 100

_installed = False
_original_entrypoint = None


class Cancel(IntEnum):
    """Client -> coordinator -> engine: a request whose client has gone."""

    CANCEL_REQUEST = CANCEL_WIRE_VALUE


def install() -> None:
    """Patch megatron's headers, client, coordinator and engine for cancellation (idempotent)."""
    global _installed, _original_entrypoint
    if _installed:
        return
    from megatron.core.inference import headers, inference_client
    from megatron.core.inference.data_parallel_inference_coordinator import handlers
    from megatron.core.inference.data_parallel_inference_coordinator.coordinator import (
        DataParallelInferenceCoordinator,
    )
    from megatron.core.inference.engines.dynamic_engine import DynamicInferenceEngine

    if Cancel not in headers.HEADER_ENUMS:
        headers.HEADER_ENUMS = headers.HEADER_ENUMS + (Cancel,)
        by_value, by_name = headers._build_tables()  # raises on a clash with megatron's own values
        headers._CODE_TO_MEMBER.update(by_value)
        headers._NAME_TO_MEMBER.update(by_name)
    handlers.HANDLERS.setdefault(Cancel.CANCEL_REQUEST, forward_cancel)
    client = inference_client.InferenceClient
    client.add_request = _add_request_wrapper(client.add_request)
    DynamicInferenceEngine.reset = _reset_wrapper(DynamicInferenceEngine.reset)
    _original_entrypoint = DataParallelInferenceCoordinator.entrypoint
    DataParallelInferenceCoordinator.entrypoint = staticmethod(coordinator_entrypoint)
    _installed = True


def coordinator_entrypoint(*args, **kwargs):
    """The coordinator's process entry point: megatron's, with cancellation installed first
    (megatron spawns the process, so nothing of its parent's patching is there)."""
    install()
    return _original_entrypoint(*args, **kwargs)


def _pack(*payload) -> bytes:
    import msgpack

    return msgpack.packb(list(payload), use_bin_type=True)


def _add_request_wrapper(original):
    def add_request(self, prompt, sampling_params):
        future = original(self, prompt, sampling_params)
        request_id = self.next_request_id - 1  # the id the original just gave it

        def on_done(f):
            if f.cancelled() and not self.socket.closed:
                self.socket.send(_pack(Cancel.CANCEL_REQUEST.value, request_id))

        future.add_done_callback(on_done)
        return future

    add_request.__wrapped__ = original
    return add_request


def forward_cancel(coordinator, sender_identity, payload):
    """The coordinator's handler: the request this client calls ``payload[1]``, to its engine."""
    client_request_id = payload[1]
    for request_id, client in coordinator.request_id_to_client_id.items():
        if client == sender_identity and coordinator.request_id_to_client_request_id.get(request_id) == \
                client_request_id:
            engine = coordinator.request_id_to_rank.get(request_id)
            if engine is not None:
                coordinator._send_to_engine(engine, _pack(Cancel.CANCEL_REQUEST.value, request_id))
            return None
    return None  # answered already


class CancelAwareSignals(collections.deque):
    """The engine's queue of control messages, which megatron fills with every message its
    first pass does not handle and which fails on one it does not know: a cancel is handled
    here instead of queued."""

    def __init__(self, engine):
        super().__init__()
        self.engine = engine

    def append(self, message):
        import msgpack

        data = msgpack.unpackb(message, raw=False)
        if data[0] != CANCEL_WIRE_VALUE:
            return super().append(message)
        request_id = data[1]
        if request_id in self.engine.requests:  # still in flight: finished as a stop word finishes one
            self.engine.stop_word_finished_request_ids.add(request_id)
            if getattr(self.engine, "is_dp_coordinator", True):
                print(f"request {request_id} cancelled (its client went away): it stops at the next step and "
                      "frees its KV blocks", flush=True)
        return None


def _reset_wrapper(original):
    def reset(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        self._pending_signals = CancelAwareSignals(self)
        return out

    reset.__wrapped__ = original
    return reset
