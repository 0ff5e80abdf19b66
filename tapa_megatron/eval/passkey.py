"""Passkey retrieval (synthetic, offline): a number hidden at some depth of a long filler text, asked for
at the end. Scored teacher-forced: the key counts as retrieved when the model's greedy next-token
choice is right at every token of the answer."""

import random

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is "


def passkey_prompt(tokenizer, length, depth, rng):
    """(tokens, answer_start, key): about `length` tokens with the needle at fraction `depth` of the filler."""
    key = str(rng.randint(10000, 99999))
    filler = tokenizer.encode(FILLER)
    needle, question, answer = (tokenizer.encode(NEEDLE.format(key=key)), tokenizer.encode(QUESTION),
                                tokenizer.encode(key))
    budget = length - len(needle) - len(question) - len(answer)
    if budget < 0:
        raise ValueError(f"length={length} tokens cannot hold the needle and the question "
                         f"({len(needle) + len(question) + len(answer)} tokens).")
    haystack = (filler * (budget // len(filler) + 1))[:budget]
    cut = int(depth * budget)
    tokens = haystack[:cut] + needle + haystack[cut:] + question + answer
    return tokens, len(tokens) - len(answer), key


def retrieved(next_token_logits, tokens, answer_start):
    """next_token_logits(tokens) -> (S, V) logits; True when the argmax predicts every answer token."""
    logits = next_token_logits(tokens[:-1])
    predicted = logits[answer_start - 1:].argmax(-1).tolist()
    return predicted == tokens[answer_start:]


def passkey_accuracy(next_token_logits, tokenizer, lengths, depths, trials, seed=0):
    """{length: {depth: accuracy}} over `trials` random keys per cell; NaN where a length is too short to
    hold the needle and the question."""
    rng = random.Random(seed)
    table = {}
    for length in lengths:
        table[length] = {}
        for depth in depths:
            try:
                passkey_prompt(tokenizer, length, depth, random.Random(0))
            except ValueError:
                table[length][depth] = float("nan")
                continue
            hits = sum(retrieved(next_token_logits, *passkey_prompt(tokenizer, length, depth, rng)[:2])
                       for _ in range(trials))
            table[length][depth] = hits / trials
    return table
