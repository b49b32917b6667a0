"""Side-by-side measurements: quality on real text, and basis-refresh micro-benchmarks."""
