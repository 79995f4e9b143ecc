"""The report's pictures and HTML templates."""
