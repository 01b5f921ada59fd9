"""Public ops, one module per op family."""
