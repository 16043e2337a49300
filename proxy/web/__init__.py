"""The aiohttp shell around the transformation core."""
