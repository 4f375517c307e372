"""Benchmarks (run as scripts: ``python bench/bench_reward.py``; results go to bench/results/)."""
