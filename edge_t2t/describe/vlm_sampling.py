"""Constrained sampling for the parallel path: each sequence's sampler, with llama.cpp's grammar
checked on the chosen token first, and the vocabulary grouped by first character for the grammar.

llama.cpp's bindings come in as an argument (`lc`: the llama_cpp module the adapter, vlm.py, has
imported and hands over): only the adapter imports llama_cpp, so importing this module never loads
the native library, and the tests hand the same module in to compare against llama.cpp's own chain.
"""

from __future__ import annotations

import collections
import ctypes
import functools
from typing import Any

from ..errors import ModelError


def utf8_incomplete_tail(data: bytes) -> bytes:
    """The bytes at the end of `data` that start a UTF-8 character not finished yet (b"" if none).
    llama.cpp's grammar carries such a partial character into the next token's first bytes."""
    for back in range(1, min(4, len(data)) + 1):
        b = data[-back]
        if b & 0xC0 == 0x80:  # a continuation byte: look further back for the lead byte
            continue
        need = 2 if b & 0xE0 == 0xC0 else 3 if b & 0xF0 == 0xE0 else 4 if b & 0xF8 == 0xF0 else 1
        return data[-back:] if need > back else b""
    return b""


class FirstCharIndex:
    """The vocabulary grouped by the first character of each token's text, for the grammar.

    llama.cpp's grammar accepts a token only if it accepts the token's first character as the next
    character, and it accepts a one-character token exactly when it accepts that character. So one
    grammar pass over the one-character tokens (probes) tells which first characters are allowed
    now, and only the tokens starting with one of them can be allowed. Where the JSON grammar is
    outside a free string, that is a small part of the vocabulary. Tokens whose first character has
    no one-character token, or whose text does not start with a whole UTF-8 character, are always
    checked; end-of-generation tokens too (the grammar allows them when its answer is complete).
    Tokens with empty text are never allowed by the grammar and are left out.
    """

    def __init__(self, lc: Any, vocab: Any, n_vocab: int):
        import numpy as np

        buf = ctypes.create_string_buffer(256)
        self.pieces: list[bytes] = []
        buckets: dict[str, list[int]] = {}
        probes: dict[str, int] = {}
        always: list[int] = []
        for tok in range(n_vocab):
            # special=True: the text llama.cpp's grammar sees (its token-to-piece cache)
            n = lc.llama_token_to_piece(vocab, tok, buf, len(buf), 0, True)
            if n < 0:  # longer than the buffer: -n is the length it needs
                buf = ctypes.create_string_buffer(-n)
                n = lc.llama_token_to_piece(vocab, tok, buf, len(buf), 0, True)
            piece = buf.raw[:n] if n > 0 else b""
            self.pieces.append(piece)
            if lc.llama_vocab_is_eog(vocab, tok):
                always.append(tok)
                continue
            if not piece or piece[0] == 0:
                continue
            first = _first_char(piece)
            if first is None:
                always.append(tok)
                continue
            buckets.setdefault(first, []).append(tok)
            if piece == first.encode("utf-8"):
                probes.setdefault(first, tok)
        for ch in [c for c in buckets if c not in probes]:
            always.extend(buckets.pop(ch))
        self.probe_chars = list(probes)
        self.probe_ids = np.array([probes[c] for c in self.probe_chars], dtype=np.int32)
        self.buckets = {c: np.array(ids, dtype=np.int32) for c, ids in buckets.items()}
        self.always = np.array(sorted(always), dtype=np.int32)
        self.n_vocab = n_vocab


def _first_char(piece: bytes) -> str | None:
    """The first character of a token's text, or None if it does not start with a whole one."""
    for n in (1, 2, 3, 4):
        try:
            return piece[:n].decode("utf-8")
        except UnicodeDecodeError:
            continue
    return None


_PENALTY_LAST_N, _REPEAT_PENALTY = 64, 1.1  # create_chat_completion's defaults


class SequenceSampler:
    """One sequence's sampling: the sequential path's chain (repeat penalty, then greedy, in numpy,
    or top-k/top-p/min-p/temperature/seed) with the grammar checked on the chosen token first.

    llama.cpp's grammar sampler tests every vocabulary entry, which costs more than a small model's
    decode step (measured: tens of ms per token at a 49k vocabulary). So, as llama.cpp's own
    common sampler does, the chain picks a token without the grammar, the grammar checks only that
    token, and the full grammar pass runs only when it is refused. Under greedy decoding the token
    is the same as with the grammar applied first (the grammar only masks tokens, the penalty only
    scales them), so this changes speed, not output.
    """

    def __init__(self, lc: Any, vocab: Any, n_vocab: int, gbnf: bytes | None, temperature: float, seed: int,
                 first_chars: FirstCharIndex | None = None):  # fmt: skip
        import numpy as np

        self.lc, self.n_vocab = lc, n_vocab
        self.first_chars = first_chars
        self.pending = b""  # an unfinished UTF-8 character at the end of the text so far
        self.chain = self.grammar = None
        # Greedy decoding runs in numpy: llama.cpp's penalty and greedy samplers walk the whole
        # vocabulary through a hash map, measured at ~3 ms a token at a 49k vocabulary (5 sequences:
        # more than a small model's decode step), against ~0.1 ms here. Same arithmetic, same token.
        self.greedy = temperature <= 0
        self.recent: collections.deque[int] = collections.deque(maxlen=_PENALTY_LAST_N)
        if not self.greedy:
            self.chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
            # create_chat_completion's defaults (repeat_penalty 1.1 over the last 64 tokens), so both
            # paths sample the same way.
            lc.llama_sampler_chain_add(self.chain, lc.llama_sampler_init_penalties(n_vocab, _PENALTY_LAST_N, _REPEAT_PENALTY, 0.0, 0.0))
            for smp in (lc.llama_sampler_init_top_k(40), lc.llama_sampler_init_top_p(0.95, 1),
                        lc.llama_sampler_init_min_p(0.05, 1), lc.llama_sampler_init_temp(temperature),
                        lc.llama_sampler_init_dist(seed)):  # fmt: skip
                lc.llama_sampler_chain_add(self.chain, smp)
        if gbnf is not None:
            self.grammar = lc.llama_sampler_init_grammar(vocab, gbnf, b"root")
            if not self.grammar:
                self.free()
                raise ModelError("llama.cpp refused the variant grammar; use --variant-mode sequential")
        dtype = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")], align=True)
        self.buf = np.zeros(n_vocab, dtype=dtype)
        self.buf["id"] = np.arange(n_vocab, dtype=np.int32)
        self.one = np.zeros(1, dtype=dtype)

    def _candidates(self, logits: Any) -> Any:
        import numpy as np

        # ids again too: top-k sorts the array in place, so the last call may have permuted them
        self.buf["id"] = np.arange(self.n_vocab, dtype=np.int32)
        self.buf["logit"] = np.ctypeslib.as_array(logits, shape=(self.n_vocab,))
        self.buf["p"] = 0.0
        return self.lc.llama_token_data_array(data=self.buf.ctypes.data_as(self.lc.llama_token_data_p),
                                              size=self.n_vocab, selected=-1, sorted=False)  # fmt: skip

    # After the grammar refuses the greedy token, it sees the best-scoring candidates first (the
    # top 1,024), then only the tokens whose first character it allows now (FirstCharIndex), and
    # the whole vocabulary only if none of those is allowed. A full pass costs ~20 ms at a 49k
    # vocabulary and ~45 ms at 152k (5 sequences, often several per step); a real model's allowed
    # token is nearly always near the top. Where it is not (outside a free string, where the JSON
    # grammar allows a few characters), the top 8,192 rarely held one either (measured on the
    # nanoLLaVA shape: 225 of 250 refusals went on to the full pass), while the first-character
    # pass looks at the few tokens that can be allowed.
    STAGES: tuple[int, ...] = (1024,)

    def _penalized(self, logits: Any) -> Any:
        """llama.cpp's penalties (repeat 1.1 over the last 64 accepted tokens; a logit <= 0 is
        multiplied, a positive one divided, in float32), on a copy."""
        import numpy as np

        x = np.array(logits, dtype=np.float32, copy=True)
        if self.recent:
            ids = np.fromiter(set(self.recent), dtype=np.int64)
            v = x[ids]
            x[ids] = np.where(v <= 0, v * np.float32(_REPEAT_PENALTY), v / np.float32(_REPEAT_PENALTY))
        return x

    def _greedy(self, logits: Any) -> int:
        """Penalties, then greedy (the first highest logit)."""
        import numpy as np

        return int(np.argmax(self._penalized(logits)))

    def _greedy_allowed(self, logits: Any) -> int:
        """The token the full grammar pass then greedy would pick, with the pass run on the
        best-scoring candidates first. The grammar only masks tokens, so when a candidate whose
        penalized logit is >= t is allowed, the best of them beats every token below t; the cut is
        by value, so ties at t are all inside, and the lowest id wins a tie as in np.argmax. Then
        on the tokens whose first character the grammar allows: every allowed token is among them."""
        import numpy as np

        x = self._penalized(np.ctypeslib.as_array(logits, shape=(self.n_vocab,)))
        for k in self.STAGES:
            if k >= self.n_vocab:
                break
            t = np.partition(x, self.n_vocab - k)[self.n_vocab - k]
            best = self._best_allowed(np.flatnonzero(x >= t), x)
            if best is not None:
                return best
        if self.first_chars is not None and not self.pending:
            best = self._best_allowed(self._allowed_first_char_tokens(), x)
            if best is not None:
                return best
        cur = self._candidates(logits)
        self.lc.llama_sampler_apply(self.grammar, ctypes.byref(cur))
        return self._greedy(self.buf["logit"])

    def _grammar_allows(self, ids: Any, logits: Any) -> Any:
        """The grammar's verdict (a bool per id) on these token ids, handed these logits."""
        lc = self.lc
        part = self.buf[: len(ids)]  # a view: the full pass rewrites the whole buffer
        part["id"], part["logit"], part["p"] = ids, logits, 0.0
        cur = lc.llama_token_data_array(data=part.ctypes.data_as(lc.llama_token_data_p),
                                        size=len(ids), selected=-1, sorted=False)  # fmt: skip
        lc.llama_sampler_apply(self.grammar, ctypes.byref(cur))
        return part["logit"] > float("-inf")

    def _best_allowed(self, ids: Any, x: Any) -> int | None:
        """The allowed id of ascending `ids` with the highest penalized logit (the lowest id on a
        tie, as np.argmax over the whole vocabulary), or None if the grammar allows none."""
        import numpy as np

        ok = self._grammar_allows(ids, x[ids])
        return int(ids[np.argmax(np.where(ok, x[ids], -np.inf))]) if ok.any() else None

    def _allowed_first_char_tokens(self) -> Any:
        """Ascending ids of the tokens whose first character the grammar allows now, plus the
        tokens always checked (see FirstCharIndex)."""
        import numpy as np

        fc = self.first_chars
        allowed = np.flatnonzero(self._grammar_allows(fc.probe_ids, 0.0))
        return np.sort(np.concatenate([fc.always, *(fc.buckets[fc.probe_chars[i]] for i in allowed)]))

    def _pick(self, logits: Any, cur: Any | None) -> int:
        """One token from the raw logits, or from `cur` (the candidates after the grammar pass)."""
        import numpy as np

        if self.greedy:
            return self._greedy(self.buf["logit"] if cur is not None else np.ctypeslib.as_array(logits, shape=(self.n_vocab,)))
        cur = cur if cur is not None else self._candidates(logits)
        self.lc.llama_sampler_apply(self.chain, ctypes.byref(cur))
        return int(self.buf["id"][cur.selected])

    def sample(self, ctx: Any, idx: int, logits: Any = None) -> int:
        """The next token from output `idx` of `ctx`. `logits`: its llama_get_logits_ith pointer when
        the caller fetched it already (that call synchronizes the backend: not safe from several
        threads, so the parallel path fetches on its own thread and samples on others)."""
        lc = self.lc
        if logits is None:
            logits = lc.llama_get_logits_ith(ctx, idx)
        tok = self._pick(logits, None)
        if self.grammar is not None:
            self.one["id"], self.one["logit"], self.one["p"] = tok, 1.0, 0.0
            single = lc.llama_token_data_array(data=self.one.ctypes.data_as(lc.llama_token_data_p),
                                               size=1, selected=-1, sorted=False)  # fmt: skip
            lc.llama_sampler_apply(self.grammar, ctypes.byref(single))
            if not self.one["logit"][0] > float("-inf") and self.greedy:  # refused: the grammar first
                tok = self._greedy_allowed(logits)
            elif not self.one["logit"][0] > float("-inf"):  # refused: the full grammar pass, then the chain
                cur = self._candidates(logits)
                lc.llama_sampler_apply(self.grammar, ctypes.byref(cur))
                tok = self._pick(logits, cur)
            lc.llama_sampler_accept(self.grammar, tok)
            if self.first_chars is not None:
                self.pending = utf8_incomplete_tail(self.pending + self.first_chars.pieces[tok])
        if self.chain is not None:
            lc.llama_sampler_accept(self.chain, tok)
        self.recent.append(tok)
        return tok

    def free(self) -> None:
        for smp in (self.chain, self.grammar):
            if smp:
                self.lc.llama_sampler_free(smp)
        self.chain = self.grammar = None



@functools.lru_cache(maxsize=8)
def json_schema_gbnf(lc: Any, schema_json: str) -> bytes:
    """llama.cpp's GBNF grammar for a JSON schema (given as sorted JSON text, so it caches)."""
    return lc.llama_grammar.json_schema_to_gbnf(schema_json).encode("utf-8")
