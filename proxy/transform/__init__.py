"""The pure transformation core: resource dicts in, resource dicts out. No HTTP here."""
