"""Checking the guarantee empirically: the canary audit, the leak test, their statistics."""
