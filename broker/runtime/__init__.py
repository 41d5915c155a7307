"""The asyncio side: actors that run the lifecycle, delivery, fan-out of status events."""
