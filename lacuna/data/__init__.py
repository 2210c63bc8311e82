"""Package data: the JSON schema of what Lacuna writes."""
