"""Lua scripts of the session cache, shipped as package data: one ``<method>.lua`` per
``RedisSessionCache`` method, each with a header naming its KEYS, ARGV and return codes, and
``prelude.lua``, the helpers every script shares (``cache.scripts`` puts them on line 2)."""
