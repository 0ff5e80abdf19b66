"""Sliding-window perplexity over long documents (Press et al. 2021, the paper's protocol).

A window of C tokens slides by `stride`; each window scores only the tokens no earlier window scored
(the first window scores all of its tokens), so every token is predicted once, with up to C - 1 tokens
of context and at least C - stride of them after the first window.
"""

import math


def sliding_window_nll(token_losses, tokens, context, stride):
    """(total NLL, scored tokens) of `tokens` with windows of `context` tokens moving by `stride`.

    token_losses(window) returns the next-token NLLs of a window: element i predicts window[i + 1].
    """
    if not 0 < stride <= context:
        raise ValueError(f"stride={stride} must be in 1..context={context}.")
    total, count = 0.0, 0
    scored_until = 1  # token 0 has no context and is never predicted
    start = 0
    while scored_until < len(tokens):
        end = min(start + context, len(tokens))
        losses = token_losses(tokens[start:end])  # predicts tokens start+1 .. end-1
        first = max(scored_until, start + 1)  # a window's first token has no context in it (stride == context)
        new = losses[first - start - 1:]
        total += float(new.sum())
        count += len(new)
        scored_until = end
        if end == len(tokens):
            break
        start += stride
    return total, count


def perplexity(token_losses, documents, context, stride, max_tokens=None):
    """Perplexity over documents (lists of token ids), each truncated to max_tokens."""
    total, count = 0.0, 0
    for tokens in documents:
        tokens = tokens[:max_tokens] if max_tokens else tokens
        doc_total, doc_count = sliding_window_nll(token_losses, tokens, context, stride)
        total, count = total + doc_total, count + doc_count
    return math.exp(total / count)
