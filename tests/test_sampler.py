"""The parallel path's per-sequence sampler, without a model: random logits in, tokens out."""

from __future__ import annotations

import ctypes

import numpy as np

from edge_t2t.describe.vlm_sampling import SequenceSampler

N_VOCAB = 3000


def _logits(rng: np.random.Generator) -> tuple[np.ndarray, object]:
    x = rng.standard_normal(N_VOCAB).astype(np.float32) * 3
    return x, ctypes.cast(x.ctypes.data, ctypes.POINTER(ctypes.c_float))


def test_numpy_greedy_picks_what_llama_cpps_penalty_and_greedy_chain_picks():
    import llama_cpp as lc

    rng = np.random.default_rng(0)
    ours = SequenceSampler(lc, None, N_VOCAB, None, 0.0, 0)
    ref = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
    lc.llama_sampler_chain_add(ref, lc.llama_sampler_init_penalties(N_VOCAB, 64, 1.1, 0.0, 0.0))
    lc.llama_sampler_chain_add(ref, lc.llama_sampler_init_greedy())
    buf = np.zeros(N_VOCAB, dtype=ours.buf.dtype)
    changed, tok = 0, None
    try:
        for step in range(300):
            x, ptr = _logits(rng)
            if tok is not None:  # make the last token a near-tie winner, so the penalty decides often
                x[tok] = x.max() + np.float32(rng.uniform(-0.2, 0.2))
            buf["id"], buf["logit"], buf["p"] = np.arange(N_VOCAB), x, 0.0
            cur = lc.llama_token_data_array(data=buf.ctypes.data_as(lc.llama_token_data_p), size=N_VOCAB,
                                            selected=-1, sorted=False)  # fmt: skip
            lc.llama_sampler_apply(ref, ctypes.byref(cur))
            want = int(buf["id"][cur.selected])
            tok = ours._pick(ptr, None)
            assert tok == want, step
            changed += tok != int(np.argmax(x))
            lc.llama_sampler_accept(ref, want)
            ours.recent.append(tok)
    finally:
        lc.llama_sampler_free(ref)
        ours.free()
    assert changed > 10  # the penalty really moved the choice, so the comparison meant something


def test_sampled_tokens_come_from_the_top_k_of_the_current_logits():
    """top-k sorts the candidates in place; the next step must not read permuted ids."""
    import llama_cpp as lc

    rng = np.random.default_rng(1)
    s = SequenceSampler(lc, None, N_VOCAB, None, 0.8, 7)
    try:
        for _ in range(50):
            x, ptr = _logits(rng)
            tok = s._pick(ptr, None)
            assert tok in set(np.argsort(-x)[:40].tolist())
            s.recent.append(tok)
    finally:
        s.free()
