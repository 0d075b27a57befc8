"""The engine core's own process: load, report ready, then loop receive -> step -> send.

Messages in: EngineCoreRequest, AbortRequests, Shutdown. Messages out: CoreReady (once),
EngineCoreOutputs (after each step, and after each batch of messages so stats stay fresh),
CoreFailed. A closed pipe means the front is gone: the process exits. SIGINT is the front's to
handle (Ctrl-C in a terminal reaches the whole process group); the core ends when told or
when the pipe closes.
"""

from __future__ import annotations

import logging
import signal
import threading

from tokenmill.config import EngineConfig
from tokenmill.engine.messages import (
    AbortRequests,
    CoreFailed,
    CoreReady,
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    RequestMetrics,
    Shutdown,
)

log = logging.getLogger(__name__)
IDLE_POLL_S = 1.0  # an idle core wakes this often to notice a vanished front


def run_engine_core(
    config: EngineConfig, conn, log_level: int = logging.INFO, binding=None
) -> None:
    if threading.current_thread() is threading.main_thread():  # not so in a Ray actor's thread
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if binding is not None:  # the instance's slice, before torch starts its threads
        from tokenmill.partition.binder import apply

        done = apply(binding)
        log.info("bound to %s%s", binding, "".join(f"; {d}" for d in done))
    from tokenmill.engine.core import EngineCore

    try:
        core = EngineCore(config)
    except Exception as exc:
        log.exception("engine core failed to start")
        conn.send(CoreFailed(str(exc), type(exc).__name__))
        return
    conn.send(CoreReady(core.info))
    try:
        _serve(core, conn)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        log.info("the front process is gone; engine core exits")
    except Exception as exc:  # a bug or a dead executor: tell the front why, then exit
        log.exception("engine core failed")
        try:
            conn.send(CoreFailed(f"{type(exc).__name__}: {exc}", type(exc).__name__))
        except OSError:
            pass
        raise SystemExit(1) from None
    finally:
        core.shutdown()


def _serve(core, conn) -> None:
    while True:
        timeout = 0.0 if core.has_unfinished() else IDLE_POLL_S
        handled = 0
        while conn.poll(timeout):
            if not _handle(core, conn, conn.recv()):
                return
            handled += 1
            timeout = 0.0
        if core.has_unfinished():
            conn.send(core.step())
        elif handled:
            conn.send(EngineCoreOutputs((), core.stats()))  # e.g. blocks freed by an abort


def _handle(core, conn, msg) -> bool:
    if isinstance(msg, EngineCoreRequest):
        try:
            core.add_request(msg)
        except Exception as exc:  # the front validated; never let one request end the core
            log.exception("request %s refused by the core", msg.request_id)
            conn.send(EngineCoreOutputs(_refused(msg, exc), core.stats()))
    elif isinstance(msg, AbortRequests):
        core.abort(msg.request_ids)
    elif isinstance(msg, Shutdown):
        return False
    else:
        log.error("unknown message %r ignored", type(msg).__name__)
    return True


def _refused(msg: EngineCoreRequest, exc: Exception) -> tuple[EngineCoreOutput, ...]:
    metrics = RequestMetrics(msg.arrival_time, None, None, None, None, 0)
    return tuple(
        EngineCoreOutput(msg.request_id, i, (), None, None, "error", str(exc), 0, metrics)
        for i in range(msg.params.n)
    )
