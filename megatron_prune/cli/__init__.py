"""Thin command-line entries: parse, validate, make one call."""
