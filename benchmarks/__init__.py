"""Speed benchmarks: ratios against a baseline run side by side (see BENCHMARKS.md)."""
