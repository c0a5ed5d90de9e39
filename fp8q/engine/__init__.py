"""fp8q's engine wing."""
