"""Eviction policies (one small interface) and the evictor that selects under a budget."""
