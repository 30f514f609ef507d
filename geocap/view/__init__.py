"""A static attention viewer for dumps (issue 6)."""
