"""The notification actor (``handler: actors.notifications:Notifier``): see ``notifier``."""

from __future__ import annotations

from actors.notifications.notifier import LogChannel, Notifier, WebhookChannel

__all__ = ["LogChannel", "Notifier", "WebhookChannel"]
