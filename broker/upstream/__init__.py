"""Upstream providers: the code that speaks an upstream network's wire protocol."""
