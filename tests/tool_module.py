"""Import a script of tools/ (not a package) as a module, for the CPU tests of its pure functions."""

import importlib.util
import os

TOOLS = os.path.join(os.path.dirname(__file__), "..", "tools")


def load_tool(name: str):
    """tools/<name>.py as a fresh module object."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(TOOLS, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
