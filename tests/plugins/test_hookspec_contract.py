"""The plugin contract stays documented and tested: every hookspec has a docstring, and some test (other than
this one) implements or calls it."""

from __future__ import annotations

import ast
import inspect
from collections.abc import Iterator
from pathlib import Path

from wamd_server.plugin_api import hookspecs
from wamd_server.plugin_api.manager import PluginHost

TESTS = Path(__file__).resolve().parents[1]
HOST_CALLS = {"call", "call_first", "call_flat"}


def hookspec_names() -> list[str]:
    names = [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(fn, "wamd_spec")]
    # the same set pluggy knows, so a spec cannot hide from this test
    known = {name for name in vars(PluginHost().pm.hook) if name.startswith("wamd_")}
    assert set(names) == known, (names, known)
    return sorted(names)


def _decorator_names(node: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    names = set()
    for decorator in node.decorator_list:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        if isinstance(target, ast.Name):
            names.add(target.id)
        elif isinstance(target, ast.Attribute):
            names.add(target.attr)
    return names


def hook_uses(source: str) -> Iterator[str]:
    """Names of hooks a test module implements (`@hookimpl def wamd_x`) or calls (`host.call("wamd_x", ...)`,
    `pm.hook.wamd_x(...)`)."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and "hookimpl" in _decorator_names(node):
            yield node.name
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr in HOST_CALLS and node.args:
                first = node.args[0]
                if isinstance(first, ast.Constant) and str(first.value).startswith("wamd_"):
                    yield str(first.value)
            elif isinstance(func, ast.Attribute) and func.attr.startswith("wamd_"):
                yield func.attr
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "@hookimpl" in node.value:
            # plugin source a test writes to disk, e.g. an entry-point plugin it installs
            try:
                inner = list(hook_uses(node.value))
            except SyntaxError:
                continue
            yield from inner


def exercised_hooks() -> dict[str, set[str]]:
    """hook name -> test files that implement or call it."""
    this = Path(__file__).resolve()
    found: dict[str, set[str]] = {}
    for path in sorted(TESTS.rglob("*.py")):
        if path.resolve() == this:
            continue
        for name in hook_uses(path.read_text(encoding="utf-8")):
            found.setdefault(name, set()).add(str(path.relative_to(TESTS)))
    return found


def test_there_are_hookspecs() -> None:
    assert {"wamd_transports", "wamd_web_routes", "wamd_before_send", "wamd_distribute_leads"} <= set(hookspec_names())


def test_every_hookspec_has_a_docstring() -> None:
    undocumented = [
        name for name in hookspec_names() if len((inspect.getdoc(getattr(hookspecs, name)) or "").strip()) < 20
    ]
    assert not undocumented, f"hookspecs without a docstring: {undocumented}"


def test_every_hookspec_is_exercised_by_a_test() -> None:
    found = exercised_hooks()
    untested = [name for name in hookspec_names() if name not in found]
    assert not untested, (
        f"hookspecs no test implements (@hookimpl) or calls (PluginHost.call*): {untested}; "
        "add a test under tests/ that exercises each"
    )


def test_the_search_finds_implementations_and_calls() -> None:
    source = '''
from wamd_server.plugin_api import hookimpl

class P:
    @hookimpl
    async def wamd_message_received(self, device, message): ...

@hookimpl(tryfirst=True)
def wamd_transports(): ...

async def f(host, pm):
    await host.call_first("wamd_distribute_leads", campaign=None, leads=[], devices=[])
    pm.hook.wamd_web_routes()

def wamd_before_send(item): ...  # not a hookimpl, not a call

PLUGIN_SOURCE = """
@hookimpl
def wamd_campaign_types(): ...
"""
'''
    assert set(hook_uses(source)) == {
        "wamd_campaign_types",
        "wamd_message_received",
        "wamd_transports",
        "wamd_distribute_leads",
        "wamd_web_routes",
    }
