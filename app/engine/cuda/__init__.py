"""The engine's Triton kernels, by what they do: decode attention (attention), the few-rows and
logits GEMMs (row_gemm, logits_gemm), residual add + LayerNorm (norms), fp8 quantisation and GEMMs
(fp8), the cache writes (kv_cache), the greedy step (greedy_step), the encoder's input stage
(encoder_input); common holds what they share, sdpa which torch attention kernel runs, workspace
their scratch buffers.

Each module imports without Triton; its launch wrappers assume a CUDA device and Triton, and are
called only by a runner that found both when it loaded (app.engine.runners.cuda).
"""
