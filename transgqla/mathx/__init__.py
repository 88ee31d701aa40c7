"""Pure tensor mathematics of the conversion: RoPE geometry, RoRoPE/FreqFold, low-rank factorization.

Nothing here reads or writes files; everything takes and returns torch tensors.
"""
