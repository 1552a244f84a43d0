"""kurrier's benchmark against Postfix: `python -m bench.run` (see bench/README.md)."""
