"""Research extracts: projects, de-identification (issue 19)."""
