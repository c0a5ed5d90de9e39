"""fp8q's models wing."""
