"""CUDA implementation via flowkern._C (work in progress: registers nothing yet)."""
