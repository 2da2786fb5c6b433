"""Serving with continued test-time training: sessions that keep their decode state."""
