"""Process-level runtime: launcher variables, process groups, seeds, CPU adaptation."""
