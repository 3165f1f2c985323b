"""The engine's prefix cache as the twin runs it: which prompt tokens a request finds cached.

The real cache (:meth:`paradapt.serve.hf_paged.PagedKV.match_prefix`) keys each full KV page by
a chain hash of its tokens, rooted in the request's adapter; a request admitted later shares
the pages that start its prompt and skips their prefill. The twin has no token ids for most
requests, so it keys pages by what is known to be shared:

* a request with token ids (a trace's ``prompt``): the chain of its pages' tokens under its
  adapter, as the engine hashes them;
* a request with a ``shared_prefix`` of S tokens: its first ``S // page`` pages are the adapter's
  shared pages ``(adapter, i)``;
* a request log's ``prefix_hashes`` (chain hashes of 16-token units): a page's key is the hash
  of the unit it ends with;

every other page is the request's own (no other request has it).

What it keeps to the engine's rules: a request matches only full pages, and never its prompt's
last token (that token runs to give the first sampled token its logits); a page is offered to
later requests once a step has written it (two requests admitted in the same step both compute
a new system prompt); pages are shared by reference, stay cached after their requests end, and
are evicted least recently released first when running requests need the room. The scheduler's
reservations do not change (a shared page counts in every sharer's, as in the engine).

What it leaves out: pages of generated tokens (the engine caches them too; the twin does not know
their tokens, so they neither hit nor take cache room here), and an adapter reloaded while
serving (the engine then keys its pages anew).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence

from ..serve.workload import PREFIX_UNIT, hash_ids

Key = Hashable


def page_keys(
    rid: str,
    adapter: str | None,
    prompt_len: int,
    page: int,
    *,
    prompt: Sequence[int] | None = None,
    shared: int = 0,
    hashes: Sequence[str] | None = None,
) -> list[Key]:
    """The keys of a request's full prompt pages (see the module docstring); a page past what
    the request shares with others is its own. Built from counts and hash strings, never from
    drawn token ids, so a long trace costs the twin little."""
    full = prompt_len // page
    if prompt is not None:  # token ids: a chain over the pages' tokens, as the engine hashes them
        return _chain(rid, adapter, full, page, prompt)
    if hashes:  # a request log's chain hashes: page i ends where unit (i + 1) * page / UNIT does
        if page % PREFIX_UNIT == 0:
            k = page // PREFIX_UNIT
            return [
                ("log", hashes[(i + 1) * k - 1]) if (i + 1) * k <= len(hashes) else ("own", rid, i)
                for i in range(full)
            ]
        return _chain(rid, adapter, full, page, hash_ids(hashes, range(3, 256)))  # pages split the units
    common = min(shared, prompt_len) // page
    return [("shared", adapter, i) if i < common else ("own", rid, i) for i in range(full)]


def _chain(rid: str, adapter: str | None, full: int, page: int, ids: Sequence[int]) -> list[Key]:
    """A chain over the pages ``ids`` fill, rooted in the adapter; the pages past them are
    ``rid``'s own."""
    keys: list[Key] = []
    h = hash(("root", adapter))
    for i in range(full):
        if (i + 1) * page > len(ids):
            keys.append(("own", rid, i))
            continue
        h = hash((h, tuple(ids[i * page : (i + 1) * page])))
        keys.append(h)
    return keys


class PrefixCacheModel:
    """Cached KV pages by key: referenced by running requests, or free and evictable (LRU)."""

    def __init__(self, page_size: int, num_blocks: int):
        self.page = page_size
        self.capacity = num_blocks
        self.refs: dict[Key, int] = {}  # cached pages running requests use -> how many use each
        # cached pages no running request uses, least recently released first (evicted first)
        self.free: OrderedDict[Key, None] = OrderedDict()
        self.keys: dict[str, list[Key]] = {}  # running request -> its full prompt pages' keys
        self.held: dict[str, int] = {}  # running request -> how many of its first pages it references
        self.queries = 0  # prompt tokens looked up (the engine's paradapt_prefix_cache_queries_total)
        self.hits = 0  # of those, found cached
        self.found: dict[str, int] = {}  # running request -> the prompt tokens it found cached
        self.evicted = 0  # cached pages given back for room

    def admit(self, rid: str, keys: list[Key], prompt_len: int) -> int:
        """Start ``rid``: share the cached pages its prompt starts with; returns the tokens they
        cover, where its prefill starts (at most ``prompt_len - 1``)."""
        n = 0
        for k in keys[: (prompt_len - 1) // self.page]:
            if k not in self.refs and k not in self.free:
                break
            n += 1
        for k in keys[:n]:
            self._acquire(k)
        self.keys[rid], self.held[rid] = keys, n
        self.queries += prompt_len
        self.hits += n * self.page
        self.found[rid] = n * self.page
        return n * self.page

    def written(self, rid: str, tokens: int) -> None:
        """``rid``'s first ``tokens`` prompt tokens are in its KV now: its full pages among them
        join the cache (a page another request cached first is shared instead, as in the engine)."""
        keys, done = self.keys.get(rid), self.held.get(rid, 0)
        if keys is None:
            return
        upto = min(tokens // self.page, len(keys))
        for k in keys[done:upto]:
            self._acquire(k)
        self.held[rid] = max(done, upto)

    def release(self, rid: str) -> int:
        """``rid`` ended: its pages stay cached, those no other request uses become evictable.
        Returns the prompt tokens it had found cached."""
        keys, n = self.keys.pop(rid, []), self.held.pop(rid, 0)
        for k in keys[:n]:
            self.refs[k] -= 1
            if not self.refs[k]:
                del self.refs[k]
                self.free[k] = None
        return self.found.pop(rid, 0)

    def evict(self, allocated: int) -> None:
        """Keep the free cached pages within what ``allocated`` pages of running requests leave."""
        room = max(0, self.capacity - allocated)
        while len(self.free) > room:
            self.free.popitem(last=False)
            self.evicted += 1

    def private_pages(self, rid: str, context: int) -> int:
        """Pages ``rid`` holds alone with ``context`` tokens in its KV (its shared ones aside)."""
        return -(-context // self.page) - self.held.get(rid, 0)

    def _acquire(self, k: Key) -> None:
        if k in self.free:
            del self.free[k]
        self.refs[k] = self.refs.get(k, 0) + 1
