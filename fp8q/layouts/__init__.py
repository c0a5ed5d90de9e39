"""fp8q's layouts wing."""
