"""Meta-training: optimizee tasks and data, flatness regularizers, the truncated-BPTT trainer."""
