"""Pixels -> tokens: fused patch embedding, nearest-codebook search and VQ layers."""
