"""The engine: tokens in, pooled representations out. Never imports daemon code."""
