"""What other actors send the notifier over ``notifications.events``."""

from __future__ import annotations

import msgspec

NOTIFICATIONS_EXCHANGE = "notifications.events"
NOTIFICATION_REQUESTED = "notification.requested"


class NotificationRequested(msgspec.Struct, frozen=True, kw_only=True):
    """Send ``template`` to ``recipient`` (an email address or a staff id); ``data`` fills the
    template's ``{placeholders}``."""

    notification_id: str
    template: str
    recipient: str
    complaint_id: str | None = None
    data: dict[str, str] = {}
