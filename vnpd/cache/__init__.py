"""Persistent embedding cache: identical sequences under identical settings are computed once."""
