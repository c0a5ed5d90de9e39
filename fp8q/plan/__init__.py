"""fp8q's plan wing."""
