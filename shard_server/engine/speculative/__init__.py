"""Speculative decoding in the engine: drafts.py (n-gram lookup, draft budgets), speculator.py (draft,
verify in one forward, accept, commit; Medusa heads by adapter), lookahead.py (the next verify forward
enqueued before a step's host work: the decode overlap for speculative steps)."""
