"""LetheDB Python SDK."""
