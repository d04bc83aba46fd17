"""Plugin host: loads plugins and calls hooks with failures isolated and awaitables awaited."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterable
from importlib.metadata import entry_points
from typing import Any

import pluggy

from wamd_server.plugin_api import hookspecs

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "wamd.server"


class PluginHost:
    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("wamd")
        self.pm.add_hookspecs(hookspecs)
        self.failures: dict[str, int] = {}  # plugin name -> hook calls that raised (exported as a metric)

    def register(self, plugin: object, name: str | None = None) -> None:
        self.pm.register(plugin, name=name)

    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> list[str]:
        """Register every installed plugin of `group`; one that fails to import is logged and skipped."""
        loaded = []
        for ep in entry_points(group=group):
            if self.pm.get_plugin(ep.name) is not None:
                continue
            try:
                self.pm.register(ep.load(), name=ep.name)
            except Exception:
                log.exception("plugin %s (%s) failed to load; continuing without it", ep.name, ep.value)
                continue
            loaded.append(ep.name)
        return loaded

    def names(self) -> list[str]:
        return sorted(name for name, _ in self.pm.list_name_plugin())

    def implemented(self, hook: str) -> bool:
        """Whether any plugin implements `hook` (a hook fired per message can skip the call when none does)."""
        return bool(getattr(self.pm.hook, hook).get_hookimpls())

    async def call(self, hook: str, **kwargs: Any) -> list[Any]:
        """Call every implementation of `hook`; returns the non-None results in pluggy's order."""
        results = []
        for impl, result in self._each(hook, kwargs):
            value = await self._settle(impl, hook, result)
            if value is not None:
                results.append(value)
        return results

    async def call_first(self, hook: str, **kwargs: Any) -> Any:
        """Call implementations until one returns something other than None (for firstresult hooks)."""
        for impl, result in self._each(hook, kwargs):
            value = await self._settle(impl, hook, result)
            if value is not None:
                return value
        return None

    async def call_flat(self, hook: str, **kwargs: Any) -> list[Any]:
        """For hooks that return lists: the concatenation of every plugin's list."""
        items: list[Any] = []
        for result in await self.call(hook, **kwargs):
            if isinstance(result, Iterable) and not isinstance(result, str | bytes | dict):
                items.extend(result)
            else:
                items.append(result)
        return items

    def _each(self, hook: str, kwargs: dict[str, Any]) -> Iterable[tuple[Any, Any]]:
        caller = getattr(self.pm.hook, hook)
        # pluggy calls the last registered first; keep that order, but one implementation at a time so a
        # failure skips only that plugin.
        for impl in reversed(caller.get_hookimpls()):
            try:
                # An implementation asking for an argument this call does not pass fails alone, like any error.
                args = {name: kwargs[name] for name in impl.argnames}
                result = impl.function(**args)
            except Exception:
                self._failed(impl, hook)
                continue
            yield impl, result

    async def _settle(self, impl: Any, hook: str, result: Any) -> Any:
        if not inspect.isawaitable(result):
            return result
        try:
            return await result
        except Exception:
            self._failed(impl, hook)
            return None

    def _failed(self, impl: Any, hook: str) -> None:
        self.failures[impl.plugin_name] = self.failures.get(impl.plugin_name, 0) + 1
        log.exception("plugin %s failed in %s; ignored", impl.plugin_name, hook)
