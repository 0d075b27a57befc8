"""The fleet supervisor's policy (tokenmill/fleet/supervisor.py) on fake instances and a fake
clock: a death marks the instance down in the router with a Retry-After, restarts wait a backoff
that doubles per failure in a row and resets after a healthy minute, the others keep serving."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tokenmill.fleet.router import Router, Unavailable
from tokenmill.fleet.supervisor import Supervisor


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def fake_engine(dead=False, stalled=0.0):
    client = SimpleNamespace(dead_reason="exit code -9" if dead else None)
    return SimpleNamespace(is_dead=dead, client=client, stalled_for=lambda: stalled)


def fake(name, dead=False):
    return SimpleNamespace(name=name, engine=fake_engine(dead))


def test_a_dead_instance_is_marked_down_and_restarted_with_backoff():
    clock = Clock()
    a, b = fake("a"), fake("b")
    router = Router({"m": ["a"], "n": ["b"]})
    outcomes = [RuntimeError("load failed"), None]  # the first restart fails

    def restart(inst):
        r = outcomes.pop(0)
        if r is not None:
            raise r
        inst.engine = fake_engine()

    sup = Supervisor([a, b], router, restart, base_delay=1.0, clock=clock)
    sup.check()
    assert router.pick("m", [1]) == "a"
    a.engine.is_dead, a.engine.client.dead_reason = True, "exit code -9"
    sup.check()
    with pytest.raises(Unavailable) as e:
        router.pick("m", [1])
    assert e.value.retry_after == pytest.approx(1.0 + 5.0)  # the backoff + a start's time
    assert router.pick("n", [1]) == "b"  # the other model keeps serving
    clock.t += 0.5
    sup.check()
    assert len(outcomes) == 2  # not due yet
    clock.t += 0.6
    sup.check()  # due: the restart fails, the next waits twice as long
    assert len(outcomes) == 1 and sup._watch["a"].failures == 2
    clock.t += 1.9
    sup.check()
    assert len(outcomes) == 1  # 2 s not over yet
    clock.t += 0.2
    sup.check()
    assert not outcomes and sup.restarts == 1 and router.pick("m", [1]) == "a"
    assert sup._watch["a"].failures == 2  # not reset until it has served a while
    clock.t += 61
    sup.check()
    assert sup._watch["a"].failures == 0


def test_backoff_is_capped():
    clock = Clock()
    a = fake("a", dead=True)
    router = Router({"m": ["a"]})

    def never(inst):
        raise OSError("no memory")

    sup = Supervisor([a], router, never, base_delay=1.0, max_delay=8.0, clock=clock)
    delays = []
    for _ in range(7):
        sup.check()
        w = sup._watch["a"]
        delays.append(w.restart_at - clock.t)
        clock.t = w.restart_at
    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 8.0]


def test_a_hung_core_is_killed_then_handled_as_dead():
    clock = Clock()
    killed = []
    process = SimpleNamespace(is_alive=lambda: not killed, kill=lambda: killed.append(1))
    a = fake("a")
    a.engine = fake_engine(stalled=30.0)
    a.engine.client.process = process
    router = Router({"m": ["a"]})
    sup = Supervisor([a], router, lambda inst: None, hang_after=60.0, clock=clock)
    sup.check()
    assert not killed and router.pick("m", [1]) == "a"  # 30 s of silence: a long step, maybe
    a.engine.stalled_for = lambda: 61.0
    sup.check()
    assert killed == [1] and sup.kills == 1
    a.engine.is_dead, a.engine.client.dead_reason = (
        True,
        "exit code -9",
    )  # what the client sees next
    sup.check()
    with pytest.raises(Unavailable):
        router.pick("m", [1])
