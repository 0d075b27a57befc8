"""The router (pure): a request goes to an instance by its `model`; among that model's replicas,
the one with the fewest outstanding tokens, unless a replica recently served the same prompt
prefix (a conversation coming back, a shared system prompt) and is not much busier: then that
one, whose prefix cache holds the prefix's KV blocks. Replicas marked down are skipped; a model
with none up is unavailable for `retry_after` seconds (the front answers 503 + Retry-After).
Thread-safe: requests are picked on the event loop, finished on the engines' client threads and
marked down or up by the supervisor's thread.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

PREFIX_LENGTHS = (1024, 256, 64)  # prompt prefixes remembered, longest looked up first
SLACK_TOKENS = 2048  # how much busier than the least loaded an affine replica may be


class UnknownModel(KeyError):
    def __init__(self, model: str, served: list[str]) -> None:
        super().__init__(model)
        self.model, self.served = model, served

    def __str__(self) -> str:
        return f"model {self.model!r} does not exist; this server serves {', '.join(map(repr, self.served))}"  # fmt: skip


class Unavailable(RuntimeError):
    def __init__(self, model: str, retry_after: float) -> None:
        super().__init__(f"model {model!r} has no instance up; retry in {retry_after:.0f} s")
        self.model, self.retry_after = model, retry_after


@dataclass
class _Replica:
    name: str
    up: bool = True
    outstanding: int = 0
    retry_after: float = 5.0


class Router:
    def __init__(self, replicas: dict[str, list[str]], memory: int = 4096) -> None:
        """`replicas`: served model name -> its replicas' names (instance names);
        `memory`: how many prompt prefixes it remembers (least recently used forgotten)."""
        if not replicas or any(not r for r in replicas.values()):
            raise ValueError("every served model needs at least one replica")
        self._models = {m: [_Replica(n) for n in names] for m, names in replicas.items()}
        self._by_name = {r.name: r for rs in self._models.values() for r in rs}
        if len(self._by_name) != sum(len(r) for r in self._models.values()):
            raise ValueError("replica names must be unique across models")
        self._prefixes: OrderedDict[tuple[str, int], str] = OrderedDict()
        self._memory = memory
        self._requests: dict[str, tuple[str, int]] = {}  # request id -> (replica, its tokens)
        self._turn = 0
        self._lock = threading.RLock()

    def models(self) -> list[str]:
        return list(self._models)

    def replicas(self, model: str) -> list[str]:
        return [r.name for r in self._replicas(model)]

    def _replicas(self, model: str) -> list[_Replica]:
        if model not in self._models:
            raise UnknownModel(model, self.models())
        return self._models[model]

    def pick(self, model: str, prompt: Sequence[int]) -> str:
        """The replica to send a request for `model` with token ids `prompt` to."""
        keys = [(model, hash(tuple(prompt[:n]))) for n in PREFIX_LENGTHS if len(prompt) >= n]
        with self._lock:
            replicas = self._replicas(model)
            up = [r for r in replicas if r.up]
            if not up:
                raise Unavailable(model, min(r.retry_after for r in replicas))
            least = min(r.outstanding for r in up)
            for key in keys:
                name = self._prefixes.get(key)
                replica = self._by_name.get(name) if name else None
                if replica is not None and replica.up and replica.outstanding <= least + SLACK_TOKENS:  # fmt: skip
                    self._remember(keys, replica.name)
                    return replica.name
            # the least loaded; ties in turn, so idle replicas share the load
            self._turn += 1
            candidates = [r for r in up if r.outstanding == least]
            chosen = candidates[self._turn % len(candidates)]
            self._remember(keys, chosen.name)
            return chosen.name

    def _remember(self, keys: list[tuple[str, int]], name: str) -> None:
        for key in keys:
            self._prefixes[key] = name
            self._prefixes.move_to_end(key)
        while len(self._prefixes) > self._memory:
            self._prefixes.popitem(last=False)

    def started(self, request_id: str, replica: str, tokens: int) -> None:
        """A request went to `replica`, promising up to `tokens` (prompt + max completion)."""
        with self._lock:
            self._by_name[replica].outstanding += tokens
            self._requests[request_id] = (replica, tokens)

    def finished(self, request_id: str) -> None:
        """Done, failed or aborted: its tokens no longer weigh on its replica."""
        with self._lock:
            got = self._requests.pop(request_id, None)
            if got is not None:
                self._by_name[got[0]].outstanding -= got[1]

    def mark_down(self, replica: str, retry_after: float = 5.0) -> None:
        with self._lock:
            r = self._by_name[replica]
            r.up, r.retry_after = False, retry_after
            for rid, (name, _) in list(self._requests.items()):  # its requests died with it
                if name == replica:
                    self.finished(rid)

    def mark_up(self, replica: str) -> None:
        with self._lock:
            self._by_name[replica].up = True

    def is_up(self, replica: str) -> bool:
        return self._by_name[replica].up

    def load(self) -> dict[str, int]:
        """Outstanding tokens per replica (for metrics)."""
        with self._lock:
            return {name: r.outstanding for name, r in self._by_name.items()}
