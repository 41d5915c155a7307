"""Scale-out on Redis: leases that decide who owns a session, instance
membership, and the coordinator that claims, renews, fences and hands over."""
