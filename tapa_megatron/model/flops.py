"""Model FLOPs of a training step, and the GPU peaks that MFU divides them by.

Model FLOPs count the math a step needs, not what the code runs: forward + backward (2 + 4 FLOPs per
weight and token of every matmul), no recompute, and causal attention as half of the full (S, S)
products. TAPA's score is two dot products whose widths add up to the head dimension, so it costs
what q·k costs; its cosine and |m-n|^alpha are not matmul FLOPs and are not counted.
"""

from dataclasses import dataclass

# Dense bf16 tensor-core peak TFLOP/s (SXM parts, no sparsity).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "B200": 2250.0}


@dataclass(frozen=True)
class TrainingFlops:
    """FLOPs per token of one training step (forward + backward) of a whole model."""

    matmul: float  # 6 x the weights of every matmul: the layers' linears and the output layer
    attention: float  # causal Q·K^T and P·V: 3 x (2 + 2) x layers x heads·head_dim x seq / 2

    @property
    def total(self):
        return self.matmul + self.attention


def layer_matmul_weights(model):
    """Weights of one layer's linears: QKV, the output projection and SwiGLU's three (the norms are
    elementwise, not matmuls)."""
    h, kv, f = model.hidden_size, model.num_query_groups * model.head_dim, model.ffn_hidden_size
    return h * (h + 2 * kv) + h * h + 3 * h * f


def matmul_weights(model, vocab_size):
    """Weights that multiply activations: every layer's linears and the output layer (the input
    embedding is a lookup)."""
    return model.num_layers * layer_matmul_weights(model) + vocab_size * model.hidden_size


def training_flops_per_token(model, seq_length, vocab_size):
    query_width = model.num_attention_heads * model.head_dim
    return TrainingFlops(matmul=6 * matmul_weights(model, vocab_size),
                         attention=6 * model.num_layers * query_width * seq_length)
