"""Who is calling: bearer tokens, SMART scopes and the caller they describe."""
