"""The continuous-batching scheduler driven by hand (no model): steps are simulated by advancing
`num_computed_tokens` and appending a token when a sequence's last known token was computed.
Then, on the tiny model, preemption and prefix sharing must not change any output."""

from __future__ import annotations

import random

import pytest

from martlet.engine.block_manager import BlockManager
from martlet.engine.scheduler import ScheduledBatch, Scheduler
from martlet.engine.sequence import Sequence, SequenceStatus
from martlet.sampling_params import SamplingParams

BS = 4


def next_token(seq: Sequence) -> int:
    """The 'model': a deterministic function of the sequence, so a recomputed sequence continues
    exactly as it would have."""
    return 1000 + (sum(seq.token_ids) * 31 + len(seq)) % 997


class Sim:
    def __init__(self, num_blocks=64, max_num_seqs=8, budget=64, prefix_caching=True):
        self.bm = BlockManager(num_blocks, BS, enable_prefix_caching=prefix_caching)
        self.sched = Scheduler(self.bm, max_num_seqs, budget, max_model_len=4096)
        self.seqs: list[Sequence] = []
        self.history: list[ScheduledBatch] = []

    def add(self, prompt, max_tokens=4, rid=None) -> Sequence:
        rid = rid if rid is not None else str(len(self.seqs))
        seq = Sequence(rid, list(prompt), SamplingParams(max_tokens=max_tokens), eos_token_ids=[])
        self.seqs.append(seq)
        self.sched.add(seq)
        return seq

    def step(self) -> ScheduledBatch:
        batch = self.sched.schedule()
        self.check(batch)
        self.history.append(batch)
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            completes = seq.num_computed_tokens + n == len(seq)
            seq.num_computed_tokens += n
            if completes:
                seq.append_token(next_token(seq))
                if seq.num_output_tokens >= seq.params.max_tokens:
                    self.sched.finish(seq, "length")
        self.check_pool()
        return batch

    def run(self, max_steps=1000) -> int:
        steps = 0
        while self.sched.num_unfinished:
            self.step()
            steps += 1
            assert steps < max_steps, "no progress"
        return steps

    def check(self, batch: ScheduledBatch) -> None:
        sched = self.sched
        assert len(batch.seqs) == len(set(map(id, batch.seqs)))
        assert batch.num_tokens <= sched.max_num_batched_tokens
        assert len(batch.seqs) <= sched.max_num_seqs and len(sched.running) <= sched.max_num_seqs
        assert all(n >= 1 for n in batch.num_new_tokens)
        assert batch.num_new_tokens[: batch.num_prefills] == [n for n in batch.num_new_tokens if n > 1]
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            assert seq in sched.running and seq.status == SequenceStatus.RUNNING
            assert seq.num_computed_tokens + n <= len(seq)
            assert len(seq.block_table) == self.bm.blocks_needed(seq.num_computed_tokens + n)
        for seq in sched.waiting:
            assert seq.status == SequenceStatus.WAITING and seq.block_table == []
            assert seq.num_computed_tokens == 0

    def check_pool(self) -> None:
        live = self.sched.running + list(self.sched.waiting)
        assert sum(b.ref_count for b in self.bm.blocks) == sum(len(s.block_table) for s in live)
        held = {b for s in live for b in s.block_table}
        assert self.bm.num_free_blocks + len(held) == self.bm.num_blocks

    def assert_all_done(self) -> None:
        assert not self.sched.running and not self.sched.waiting
        assert self.bm.num_free_blocks == self.bm.num_blocks
        assert all(b.ref_count == 0 for b in self.bm.blocks)
        for seq in self.seqs:
            assert seq.is_finished and seq.block_table == []
            assert seq.output_token_ids == expected_outputs(seq)


def expected_outputs(seq: Sequence) -> list[int]:
    ref = Sequence("ref", seq.token_ids[: seq.num_prompt_tokens], seq.params, [])
    for _ in range(seq.params.max_tokens):
        ref.append_token(next_token(ref))
    return ref.output_token_ids


def prompt(n: int, base: int = 0) -> list[int]:
    return [base + i for i in range(n)]


# ---- admission, budget, limits -----------------------------------------------------------------


def test_fcfs_admission_and_max_num_seqs():
    sim = Sim(max_num_seqs=2)
    a, b, c, d = (sim.add(prompt(5, 100 * i), max_tokens=3 + i) for i in range(4))
    batch = sim.step()
    assert batch.seqs == [a, b] and list(sim.sched.waiting) == [c, d]
    assert a.status == b.status == SequenceStatus.RUNNING and c.status == SequenceStatus.WAITING
    assert a.metrics.first_scheduled_time <= b.metrics.first_scheduled_time
    assert c.metrics.first_scheduled_time is None
    sim.step()
    sim.step()  # a has its 3 tokens and leaves
    assert a.is_finished and a.finish_reason == "length"
    batch = sim.step()
    assert c in batch.seqs and d not in batch.seqs  # c came before d
    sim.run()
    order = sorted(sim.seqs, key=lambda s: s.metrics.first_scheduled_time)
    assert order == [a, b, c, d]
    sim.assert_all_done()


def test_chunked_prefill_splits_a_long_prompt_across_steps():
    sim = Sim(budget=8)
    a = sim.add(prompt(20), max_tokens=2)
    sizes = []
    while a.num_output_tokens == 0:
        batch = sim.step()
        sizes.append(batch.num_new_tokens)
        assert batch.num_prefills == (1 if batch.num_new_tokens[0] > 1 else 0)
    assert sizes == [[8], [8], [4]]
    assert a.num_output_tokens == 1  # only the step that completed the prompt sampled
    sim.run()
    sim.assert_all_done()


def test_budget_is_shared_and_the_rest_is_chunked():
    sim = Sim(budget=10)
    a = sim.add(prompt(6), max_tokens=3)
    b = sim.add(prompt(6, 50), max_tokens=3)
    batch = sim.step()
    assert list(zip(batch.seqs, batch.num_new_tokens)) == [(a, 6), (b, 4)]
    batch = sim.step()
    assert list(zip(batch.seqs, batch.num_new_tokens)) == [(b, 2), (a, 1)]  # prefills first
    assert batch.num_prefills == 1
    sim.run()
    sim.assert_all_done()


def test_decodes_are_scheduled_before_new_prefills():
    sim = Sim(budget=4)
    a = sim.add(prompt(4), max_tokens=20)
    sim.step()
    b = sim.add(prompt(10, 50), max_tokens=2)
    batch = sim.step()
    assert list(zip(batch.seqs, batch.num_new_tokens)) == [(b, 3), (a, 1)]
    sim2 = Sim(budget=1)
    a2 = sim2.add(prompt(1), max_tokens=5)
    sim2.step()
    b2 = sim2.add(prompt(3, 50), max_tokens=1)
    for _ in range(3):
        assert sim2.step().seqs == [a2]  # the single token of budget always goes to the decode
    assert b2.status == SequenceStatus.WAITING
    sim2.run()
    sim2.assert_all_done()


def test_decodes_run_longest_context_first():
    sim = Sim(budget=64)
    short = sim.add(prompt(3), max_tokens=5)
    long_ = sim.add(prompt(9, 50), max_tokens=5)
    mid = sim.add(prompt(6, 100), max_tokens=5)
    sim.step()  # the three prompts
    batch = sim.step()
    assert batch.num_prefills == 0
    assert batch.seqs == [long_, mid, short]
    sim.run()
    sim.assert_all_done()


def test_max_num_seqs_is_respected_under_load():
    sim = Sim(max_num_seqs=3, budget=16)
    for i in range(10):
        sim.add(prompt(3 + i % 4, 100 * i), max_tokens=2 + i % 3)
    sim.run()  # Sim.check asserts the limit at every step
    assert max(len(b.seqs) for b in sim.history) == 3
    sim.assert_all_done()


def test_empty_schedule_when_nothing_to_do():
    sim = Sim()
    batch = sim.sched.schedule()
    assert not batch and batch.num_tokens == 0 and batch.num_prefills == 0


# ---- preemption ---------------------------------------------------------------------------------


def test_newest_running_sequence_is_preempted_and_resumes():
    sim = Sim(num_blocks=4, prefix_caching=False)
    a = sim.add(prompt(6), max_tokens=6)
    b = sim.add(prompt(6, 50), max_tokens=6)
    c = sim.add(prompt(2, 90), max_tokens=1)
    sim.step()  # a and b prefill: 2 blocks each, the pool is full; c waits
    assert sim.bm.num_free_blocks == 0 and list(sim.sched.waiting) == [c]
    sim.step()
    sim.step()  # the 8th token of each is computed: still 2 blocks
    assert [len(s) for s in (a, b)] == [9, 9] and sim.bm.num_free_blocks == 0
    batch = sim.step()  # a needs a third block for its 9th token: b, the newest, is preempted
    assert batch.seqs == [a]
    assert list(sim.sched.waiting) == [b, c]  # b goes to the front, ahead of c
    assert b.status == SequenceStatus.WAITING and b.block_table == [] and b.num_computed_tokens == 0
    assert b.metrics.num_preemptions == 1 and a.metrics.num_preemptions == 0
    assert b.num_output_tokens == 3  # nothing it generated is lost
    assert len(a.block_table) == 3
    sim.run()
    assert b.metrics.num_preemptions >= 1
    sim.assert_all_done()  # b's outputs equal those of an uninterrupted run


def test_a_step_that_preempts_admits_no_newcomer():
    sim = Sim(num_blocks=5, prefix_caching=False)
    a = sim.add(prompt(8), max_tokens=8)
    b = sim.add(prompt(7, 50), max_tokens=8)
    sim.step()
    assert sim.bm.num_free_blocks == 1
    c = sim.add([7], max_tokens=1)  # would fit in a free block
    sim.step()  # b: 8 tokens, fits; a: 9 tokens, takes the last block
    assert sim.bm.num_free_blocks == 0
    batch = sim.step()  # b needs a block: b preempted; c must not come in on this step
    assert b.metrics.num_preemptions == 1 and batch.seqs == [a]
    assert c.status == SequenceStatus.WAITING
    sim.run()
    sim.assert_all_done()


def test_the_sequence_itself_is_preempted_when_it_is_the_newest():
    sim = Sim(num_blocks=3, prefix_caching=False)
    a = sim.add(prompt(3), max_tokens=10)
    b = sim.add(prompt(3, 50), max_tokens=10)
    sim.step()  # one block each, one free
    sim.step()
    assert len(a) == len(b) == 5  # a then b each need a second block: a takes the free one
    batch = sim.step()
    assert batch.seqs == [a] and b.metrics.num_preemptions == 1
    assert list(sim.sched.waiting) == [b]
    sim.run()
    sim.assert_all_done()


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_preempted_sequence_reuses_its_cached_prefix(prefix_caching):
    sim = Sim(num_blocks=6, budget=64, prefix_caching=prefix_caching)
    a = sim.add(prompt(9), max_tokens=8)
    b = sim.add(prompt(9, 50), max_tokens=8)
    sim.run()
    assert b.metrics.num_preemptions >= 1
    sim.assert_all_done()
    resumed = [n for batch in sim.history for s, n in zip(batch.seqs, batch.num_new_tokens)
               if s is b and n > 1][1:]
    assert resumed  # b was prefilled again after its preemption
    if prefix_caching:  # ... but not from scratch: its first full blocks were still cached
        assert min(resumed) < len(prompt(9)) + 1
    assert a.is_finished


def test_finish_frees_blocks_and_removes_from_any_queue():
    sim = Sim(max_num_seqs=1)
    a = sim.add(prompt(9), max_tokens=100)
    b = sim.add(prompt(5, 50), max_tokens=100)
    sim.step()
    assert sim.bm.num_free_blocks == sim.bm.num_blocks - 3
    sim.sched.finish(b, "abort")  # from waiting
    assert b.is_finished and b not in sim.sched.waiting
    sim.sched.finish(a, "abort", None)  # from running
    assert a.is_finished and a.finish_reason == "abort" and a not in sim.sched.running
    assert a.block_table == [] and sim.bm.num_free_blocks == sim.bm.num_blocks
    assert sim.sched.num_unfinished == 0 and not sim.sched.schedule()


@pytest.mark.parametrize("seed", range(5))
def test_random_workload_finishes_everything_without_leaks(seed):
    """Random arrivals into a small pool with a small budget: preemptions and chunked prefills
    everywhere. Every step obeys the limits (Sim.check), every sequence ends with exactly the
    tokens an uninterrupted run gives, and the pool ends empty."""
    rng = random.Random(seed)
    sim = Sim(num_blocks=8, max_num_seqs=rng.choice([3, 4, 8]), budget=rng.choice([5, 9, 16]),
              prefix_caching=bool(seed % 2))
    shared = prompt(9, 7000)
    pending = []
    for _ in range(16):
        body = shared[: rng.randrange(0, 10)] + [rng.randrange(900) for _ in range(rng.randrange(1, 8))]
        pending.append((body, rng.randint(1, 14)))  # at most 30 tokens: fits the 32-token pool
    steps = 0
    while pending or sim.sched.num_unfinished:
        for _ in range(rng.randrange(3)):
            if pending:
                body, max_tokens = pending.pop()
                sim.add(body, max_tokens)
        if sim.sched.num_unfinished:
            sim.step()
        steps += 1
        assert steps < 2000
    sim.assert_all_done()
    assert sum(s.metrics.num_preemptions for s in sim.seqs) > 0


# ---- engine level -------------------------------------------------------------------------------

ENGINE_PROMPTS = ["Hello, my name is", "The capital of France", "Once upon a time", "1, 2, 3, 4,", "Why",
                  "The quick brown fox jumps over the lazy dog, and then"]


def test_preemption_and_chunked_prefill_in_the_engine_change_no_output(tiny_model, tiny_llm, assert_idle):
    from martlet.llm import LLM

    params = [SamplingParams(temperature=0.0, max_tokens=10) for _ in ENGINE_PROMPTS]
    params[2] = SamplingParams(temperature=1.0, seed=11, max_tokens=10)
    params[4] = SamplingParams(temperature=0.0, max_tokens=10, min_tokens=10, ignore_eos=True)
    big = tiny_llm.generate(ENGINE_PROMPTS, params, use_tqdm=False)
    # 8 blocks of 4 tokens and 7 tokens a step: preemptions, and prompts prefilled in chunks
    small = LLM(tiny_model, device="cpu", dtype="float32", num_kv_blocks=8, block_size=4,
                max_num_batched_tokens=7, quiet=True)
    assert small.engine.config.max_model_len == 32
    assert len(small.get_tokenizer().encode(ENGINE_PROMPTS[-1])) > 7
    outs = small.generate(ENGINE_PROMPTS, params, use_tqdm=False)
    assert sum(o.metrics.num_preemptions for o in outs) > 0
    for i, (ref, out) in enumerate(zip(big, outs)):
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids, (i, [o.metrics.num_preemptions for o in outs])
        assert out.outputs[0].text == ref.outputs[0].text
        assert out.outputs[0].finish_reason == ref.outputs[0].finish_reason
    assert_idle(small)
    assert_idle(tiny_llm)


def test_shared_prefix_in_one_batch_changes_no_output(tiny_llm, tokenizer, assert_idle):
    """Identical and prefix-sharing prompts in one batch reuse cached blocks (some in the very
    step that fills them); outputs must equal those of each prompt alone."""
    system = "You are a helpful assistant. Answer briefly and precisely, in English. " * 3
    prompts = [system + "Question one?", system + "Question one?", system + "Another question", system]
    assert len(tokenizer.encode(system)) > 32  # at least two full blocks of 16 are shared
    params = SamplingParams(temperature=0.0, max_tokens=6)
    alone = [tiny_llm.generate(p, params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    together = [o.outputs[0].token_ids for o in tiny_llm.generate(prompts, params, use_tqdm=False)]
    assert together == alone
    again = [o.outputs[0].token_ids for o in tiny_llm.generate(prompts[::-1], params, use_tqdm=False)]
    assert again == alone[::-1]
    assert_idle(tiny_llm)
