"""Real English text for judging lossy formats, and the agreement figure they are judged by.

The passages are public domain (Carroll, Austen, Lincoln, the Declaration of Independence). A lossy
format is scored by next-token top-1 agreement with the unquantized model: every passage is cut at
many points, and each cut's greedy next token is compared.
"""

from __future__ import annotations

PASSAGES = [
    "Alice was beginning to get very tired of sitting by her sister on the bank, and of having nothing to do: "
    "once or twice she had peeped into the book her sister was reading, but it had no pictures or conversations "
    "in it, 'and what is the use of a book,' thought Alice 'without pictures or conversations?' So she was "
    "considering in her own mind (as well as she could, for the hot day made her feel very sleepy and stupid), "
    "whether the pleasure of making a daisy-chain would be worth the trouble of getting up and picking the "
    "daisies, when suddenly a White Rabbit with pink eyes ran close by her.",
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
    "of a wife. However little known the feelings or views of such a man may be on his first entering a "
    "neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is considered "
    "the rightful property of some one or other of their daughters. 'My dear Mr. Bennet,' said his lady to him "
    "one day, 'have you heard that Netherfield Park is let at last?' Mr. Bennet replied that he had not.",
    "Four score and seven years ago our fathers brought forth on this continent, a new nation, conceived in "
    "Liberty, and dedicated to the proposition that all men are created equal. Now we are engaged in a great "
    "civil war, testing whether that nation, or any nation so conceived and so dedicated, can long endure. We "
    "are met on a great battle-field of that war. We have come to dedicate a portion of that field, as a final "
    "resting place for those who here gave their lives that that nation might live.",
    "We hold these truths to be self-evident, that all men are created equal, that they are endowed by their "
    "Creator with certain unalienable Rights, that among these are Life, Liberty and the pursuit of Happiness. "
    "That to secure these rights, Governments are instituted among Men, deriving their just powers from the "
    "consent of the governed, That whenever any Form of Government becomes destructive of these ends, it is the "
    "Right of the People to alter or to abolish it, and to institute new Government.",
]

QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write one sentence about the sea.",
    "What is 12 plus 30?",
]


def cut_points(tokenizer, first: int = 8, stride: int = 3) -> list[list[int]]:
    """Every passage's token ids cut after `first`, `first + stride`, ... tokens."""
    prompts = []
    for text in PASSAGES:
        ids = tokenizer.encode(text)
        prompts += [ids[:n] for n in range(first, len(ids), stride)]
    return prompts


def next_tokens(llm, prompts: list[list[int]]) -> list[int]:
    """The greedy next token after each prompt. The longest prompts go first, alone: the shorter
    ones then find their whole blocks in the prefix cache and compute only their last partial one."""
    from martlet import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    longest = [p for i, p in enumerate(prompts) if i + 1 == len(prompts) or prompts[i + 1][: len(p)] != p]
    llm.generate([{"prompt_token_ids": p} for p in longest], params, use_tqdm=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids[0] for o in outs]


def agreement(reference: list[int], other: list[int]) -> float:
    return sum(a == b for a, b in zip(reference, other)) / len(reference)


def greedy_answers(llm, max_tokens: int = 32) -> list[list[int]]:
    from martlet import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    outs = llm.chat([[{"role": "user", "content": q}] for q in QUESTIONS], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]
