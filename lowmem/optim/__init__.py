"""The per-weight update: gradient operators, randomized SVD, projectors, refresh policy, sparse residuals,
8-bit moments, low-rank Adam, float AdamW, and the weights an update writes. Imports neither model/ nor checkpoint/."""
