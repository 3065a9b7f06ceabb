"""Model families: checkpoint format, alphabet and packed forward, one module each."""
