"""Pure domain logic: templates, attribution, retry policy, input validation (stdlib only)."""
