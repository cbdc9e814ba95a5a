"""Jinja2 kernel templates (package data): ``triton/<role>.py.j2`` and ``tilelang/<role>.py.j2``."""
