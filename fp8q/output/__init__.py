"""fp8q's output wing."""
