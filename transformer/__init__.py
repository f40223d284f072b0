"""Character-level transformer language model trained with GD / SAM (Long & Bartlett 2024)."""
