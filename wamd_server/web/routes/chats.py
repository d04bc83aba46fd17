"""Chats: the chat list, history and manual sends of a device."""

from __future__ import annotations

from wamd_server.web.routing import RouteTable

routes = RouteTable()
