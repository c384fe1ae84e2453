"""Benchmark material kept outside the raydistill package (not installed): see reference/."""
