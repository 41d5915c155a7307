"""A small web dashboard: a live session table and pairing QR codes.

It is a gRPC *client* of the broker (StreamStatus, GetQr), so it can run
inside `broker serve --dashboard-listen` or as `broker dashboard --target`.
"""

from broker.dashboard.server import DashboardServer, event_to_json, qr_svg

__all__ = ["DashboardServer", "event_to_json", "qr_svg"]
