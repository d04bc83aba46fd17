"""The public plugin contract of the wamd server (pluggy project ``wamd``).

A plugin is a module or object with functions named like the hooks below, decorated with ``hookimpl``::

    from wamd_server.plugin_api import hookimpl

    @hookimpl
    def wamd_message_received(device, message):
        ...

and registered through the ``wamd.server`` entry-point group in its ``pyproject.toml``::

    [project.entry-points."wamd.server"]
    my_plugin = "my_package.plugin"

Any hook may be ``async def`` (or return an awaitable): the core awaits it. A hook that raises is logged with
the plugin's name and skipped; it never breaks sending, pairing or the API. Built-in features (the transports,
the broadcast campaign type, lead distribution) are plugins using these same hooks.
"""

from __future__ import annotations

from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("wamd")


@hookspec
def wamd_campaign_types() -> Any:
    """Campaign types this plugin offers.

    Return a list of :class:`~wamd_server.plugin_api.types.CampaignTypeSpec`. Their names appear at
    ``GET /api/campaign-types`` and are valid as a campaign's ``type``; names must be unique across plugins
    (a later duplicate is ignored with a warning).
    """


@hookspec(firstresult=True)
def wamd_distribute_leads(campaign: Any, leads: Any, devices: Any, ctx: Any) -> Any:
    """Choose a sending device for each lead that has no owner device.

    ``campaign`` is the campaign being planned, ``leads`` the leads without an owner device, ``devices`` the
    devices that may send (linked, not banned or logged out, queue not paused). Return a mapping
    ``{lead_id: device_id}`` (leads left out stay unassigned) or ``None`` to let the next plugin decide (the
    default is round robin). The first non-``None`` answer wins. Called once per page of leads.

    ``ctx`` (accept it only if needed) is the launch's :class:`~wamd_server.services.planner.PlanContext`, the
    read API a distributor may use instead of the database: ``await ctx.devices()`` (every device of the
    campaign, whatever its state), ``await ctx.device_history(days, device_ids)`` →
    ``{device_id: {"sent": n, "failed": n, "replied": n}}`` (outbox messages sent and failed in the last
    ``days`` days, and recipients who wrote to the device after its message), and
    ``await ctx.save_distribution_report(plugin, report)`` / ``await ctx.distribution_report(plugin)`` to keep
    a JSON document explaining the choice (one per campaign and plugin; deleted with the campaign).
    ``ctx.rescue`` is True when the leads' messages are already queued on a device that has not been able to
    send for five minutes and are to move (leads left out stay there); False when the campaign is planned.
    """


@hookspec
def wamd_before_send(item: Any) -> Any:
    """Inspect, edit or veto an outbound message just before it is sent.

    ``item`` is the outbox item (recipient, text, device, source). A plugin may change ``item.text`` in place;
    the item has fixed fields (it takes no attributes of a plugin's own).
    Return ``False`` or a non-empty string (the reason) to veto: the message is then cancelled with that reason
    and never sent. Return ``None`` to let it go.
    """


@hookspec
def wamd_message_received(device: Any, message: Any, ctx: Any) -> Any:
    """A message reached one of our devices and was stored.

    ``device`` is the :class:`~wamd_server.domain.models.Device`, ``message`` the
    :class:`~wamd_server.domain.models.InboundMessage` (fixed fields). Called after the database commit, once per
    message (a redelivered message id is not reported again). Also called for messages our own account sent from the
    phone (``message.from_me``).

    ``ctx`` (accept it only if needed) sends messages through the outbox, paced like any other, once per key:
    ``if not message.from_me and message.sender_phone: await ctx.send(device.id, message.sender_phone, "Thanks,
    we will call you", key=f"thanks:{message.wa_id}")``
    (see :class:`~wamd_server.services.plugin_outbox.PluginOutbox` for ``at``, ``paced`` and ``user_id``). It
    returns False when the key was used already; bad input raises ``InvalidInput``.
    """


@hookspec
def wamd_device_status_changed(device: Any, old: Any, new: Any) -> Any:
    """A device's status changed (``old`` and ``new`` are :class:`~wamd_server.domain.models.DeviceStatus`).

    ``device`` is the device after the change, with ``status_reason`` explaining it (for example why it was
    logged out or until when it is banned). Called after the change is stored.
    """


@hookspec
def wamd_web_routes() -> Any:
    """HTTP routes this plugin adds to the API.

    Return a list of :class:`~wamd_server.plugin_api.types.WebRoute`. Paths must start with ``/api/`` and must
    not clash with core routes. The core applies authentication, error envelopes and OpenAPI documentation.
    """


@hookspec
def wamd_transports() -> Any:
    """WhatsApp transports this plugin provides.

    Return a list of :class:`~wamd_server.plugin_api.types.TransportSpec`; ``WAMD_TRANSPORT`` selects one by
    name. The built-in ``neonize`` (real WhatsApp) and ``sim`` (simulated network) transports come this way.
    """
