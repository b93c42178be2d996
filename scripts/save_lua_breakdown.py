"""Where ``save.lua``'s server time goes: the script against variants that each leave one part out.

``.venv/bin/python scripts/save_lua_breakdown.py [--rounds 7] [--calls 3000]`` (from the
repository root; a private ``redis-server``, no database). A session of the benchmarks'
realistic agent state is saved once through the store; then the real save's ``KEYS`` and
``ARGV`` (any version, so every call takes the loop's path: the session already dirty) are
sent with ``EVALSHA`` to ``save.lua`` and to variants of it, the variants taking turns round
by round; each prints its median server µs per call (``INFO commandstats``, reset before each
variant's calls) over the rounds. ``empty`` returns before its first command (what the
arguments and the prelude's definitions cost), ``raw`` is the benchmarks' two-command raw
script given only the snapshot. Every variant must answer as a save does, and the session
must be dirty, or the script stops. Variants are measurements, never loaded by the store.
The README's "Where ours' CPU goes" quotes it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import cast

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.agent_state import agent_states
from bench.harness import private_redis
from bench.hot_path import RAW_SAVE_LUA, build_keys, build_writes
from cache.client import connect
from cache.scripts import source
from cache.settings import Settings
from cache.store import RedisSessionCache

_HEAD = "local owner_state = redis.call('HGET', owner, 'state')"
_WRITES = "local now = now_ms()"

VARIANTS: dict[str, list[tuple[str, str]]] = {
    "save.lua": [],
    "no iso_of": [
        ("local now_iso = iso_of(now)", "local now_iso = '2026-01-01T00:00:00.000+00:00'")
    ],
    "no member_of": [("local member = member_of(session)", "local member = 'a:b:c'")],
    "no HDEL": [("if #dels > 0 then", "if false then")],
    "no TIME": [(_WRITES, "local now = 1765000000000")],
    "no ZSCORE": [
        ("local was_dirty = redis.call('ZSCORE', dirty, session)", "local was_dirty = '1'")
    ],
    "no SADD": [
        (
            "if redis.call('SADD', owner_sessions, member) == 1 or not was_dirty then",
            "if not was_dirty then",
        )
    ],
    # The field loop below copies save.lua's (FIELDS from ARGV[FIRST_FIELD + 1] on): keep them
    # alike; the script stops if the anchor it replaces is gone, not if the loop drifts.
    "HSET only": [
        (
            _HEAD,
            "local sets = {'updated_at', 'x', 'version', 1, 'content_id', content_id}\n"
            "for i, field in ipairs(FIELDS) do local value = ARGV[FIRST_FIELD + i] "
            "if value ~= '' then sets[#sets + 1] = field sets[#sets + 1] = value end end\n"
            f"redis.call('HSET', session, unpack(sets))\ndo return {{0, 1}} end\n{_HEAD}",
        )
    ],
    "reads only": [(_WRITES, f"do return {{0, 1}} end\n{_WRITES}")],
    "empty": [(_HEAD, f"do return {{0, 1}} end\n{_HEAD}")],
}


def _variant(edits: list[tuple[str, str]]) -> str:
    text = source("save")
    for old, new in edits:
        if text.count(old) != 1:
            raise SystemExit(f"save.lua no longer holds {old!r} once: update this script")
        text = text.replace(old, new)
    return text


def _check_saves(send: Callable[[], object], name: str) -> None:
    """Every variant must answer as a save does ({0, version}), or its time means nothing."""
    reply = send()
    if not isinstance(reply, list) or reply[:1] != [0]:
        raise SystemExit(f"{name} answered {reply!r}, not a save's {{0, version}}")


def _usec_per_call(client: redis.Redis, send: Callable[[], object], calls: int) -> float:
    client.config_resetstat()
    for _ in range(calls):
        send()
    stats = cast(dict[str, dict[str, float]], client.info("commandstats"))
    return stats["cmdstat_evalsha"]["usec_per_call"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=3000)
    opts = parser.parse_args()
    with private_redis() as url:
        settings = Settings(redis_url=url)
        cache = RedisSessionCache(connect(settings), settings)
        key = build_keys(1)[0]
        write = build_writes(agent_states(None))[0]
        cache.save(key, write)
        keys, args = cache.save_call(key, write)
        snapshot = cache.codec.write_values(write)[0]
        client = redis.Redis.from_url(url)
        shas = {name: client.script_load(_variant(edits)) for name, edits in VARIANTS.items()}
        raw_sha = client.script_load(RAW_SAVE_LUA)
        sends: dict[str, Callable[[], object]] = {
            name: partial(client.evalsha, sha, len(keys), *keys, *args)
            for name, sha in shas.items()
        }
        for name, send in sends.items():
            _check_saves(send, name)
        sends["raw"] = partial(client.evalsha, raw_sha, 1, "bench:raw:0", snapshot)
        if client.zscore(keys[3], keys[0]) is None:
            raise SystemExit(
                "the session is not dirty: the variants would not take the loop's path"
            )
        results: dict[str, list[float]] = {name: [] for name in sends}
        for round_ in range(opts.rounds):
            for name, send in sends.items():
                results[name].append(_usec_per_call(client, send, opts.calls))
            print(f"  round {round_ + 1}/{opts.rounds}", flush=True)
        print(f"server µs per call, median of {opts.rounds} rounds of {opts.calls} calls:")
        for name, values in results.items():
            spread = f"{min(values):.1f}-{max(values):.1f}"
            print(f"  {name:14s} {statistics.median(values):6.1f}  ({spread})")
        client.close()
        cache.close()


if __name__ == "__main__":
    main()
