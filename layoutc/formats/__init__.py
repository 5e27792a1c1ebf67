"""Storage formats: reading and writing checkpoint files without torch."""
