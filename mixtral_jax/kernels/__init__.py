"""Backend-specific compute, apart from the model's math: the 2-D matmul with its CPU gradient
(matmul.py), row layouts for grouped matmuls (rows.py), grouped SwiGLU per backend (grouped.py,
grouped_cpu.py, grouped_pallas.py), cuDNN's packed-document attention (packed_attention.py),
and `Kernels` (backend.py): which of them a model runs, resolved once."""
