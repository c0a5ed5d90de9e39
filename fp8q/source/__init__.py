"""fp8q's source wing."""
