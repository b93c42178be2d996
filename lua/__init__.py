"""Lua scripts of the session cache, shipped as package data (one file per operation)."""
