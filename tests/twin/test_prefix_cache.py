"""The twin's model of the engine's prefix cache: what a request finds cached, and what is evicted."""

from __future__ import annotations

from paradapt.twin.prefix_cache import PrefixCacheModel, page_keys


def test_keys_share_only_whole_pages_of_the_shared_start_under_one_adapter():
    a = page_keys("r1", "x", 40, 16, shared=20)  # 20 shared tokens: one whole page of 16
    b = page_keys("r2", "x", 40, 16, shared=20)
    assert len(a) == 2 and a[0] == b[0] and a[1] != b[1]  # page 2 holds tokens past the shared start
    assert page_keys("r3", "y", 40, 16, shared=20)[0] != a[0]  # another adapter: other pages
    ids = list(range(40))
    same = page_keys("r4", "x", 40, 16, prompt=ids), page_keys("r5", "x", 33, 16, prompt=ids[:33])
    assert same[0] == same[1]  # token ids: a chain over the pages' tokens
    assert page_keys("r6", "x", 40, 16, prompt=[99, *ids[1:]])[1] != same[0][1]  # an earlier token differs


def test_a_request_logs_hashes_key_pages_of_any_size():
    h1, h2 = ["a1", "a2", "a3", "a4"], ["a1", "a2", "b3", "b4"]  # the same first 32 tokens
    assert page_keys("r1", "x", 64, 32, hashes=h1)[0] == page_keys("r2", "x", 64, 32, hashes=h2)[0]
    assert page_keys("r1", "x", 64, 32, hashes=h1)[1] != page_keys("r2", "x", 64, 32, hashes=h2)[1]
    k8 = page_keys("r1", "x", 64, 8, hashes=h1), page_keys("r2", "x", 64, 8, hashes=h2)  # pages split the units
    assert k8[0][:4] == k8[1][:4] and k8[0][4] != k8[1][4]
    assert page_keys("r3", "x", 64, 16, hashes=h1[:1])[1] == ("own", "r3", 1)  # past the hashes: its own
    same = page_keys("r4", "x", 64, 8, hashes=h1[:1]), page_keys("r5", "x", 64, 8, hashes=h1[:1])
    assert same[0][:2] == same[1][:2] and same[0][2] != same[1][2]  # equal starts; the rest each one's own


def _keys(rid: str, n: int) -> list:
    return page_keys(rid, None, n, 4, shared=8)


def test_a_page_is_found_once_written_never_the_prompts_last_token_and_not_after_eviction():
    c = PrefixCacheModel(page_size=4, num_blocks=10)
    keys = _keys("a", 8)
    assert c.admit("a", keys, 8) == 0  # nothing cached yet
    assert c.admit("b", _keys("b", 8), 8) == 0  # same step: not written yet
    c.written("a", 8)
    c.written("b", 8)  # b's pages are a's: shared, not copied
    assert len(c.refs) == 2 and c.refs[keys[0]] == 2
    assert c.admit("c", _keys("c", 8), 8) == 4  # the last token's page runs
    assert c.admit("d", _keys("d", 9), 9) == 8
    assert (c.queries, c.hits) == (33, 12)
    for rid in "abcd":
        c.release(rid)
    assert not c.refs and list(c.free) == keys  # released, kept, least recently released first
    c.evict(allocated=9)  # one page of room left
    assert list(c.free) == [keys[1]]
    assert c.admit("e", _keys("e", 9), 9) == 0  # its first page is gone


def test_private_pages_leave_out_the_shared_ones():
    c = PrefixCacheModel(page_size=4, num_blocks=10)
    c.admit("a", _keys("a", 8), 8)
    c.written("a", 8)
    assert c.private_pages("a", 10) == 1  # 3 pages for 10 tokens, 2 of them in the cache
