"""A web dashboard to act from: live sessions, sign-in, actions, per-session health.

It is a gRPC *client* of the broker, calling as the signed-in token, so it can
run inside `broker serve --dashboard-listen` or as `broker dashboard --target`.
"""

from broker.dashboard.server import DashboardServer
from broker.dashboard.views import event_to_json, qr_svg

__all__ = ["DashboardServer", "event_to_json", "qr_svg"]
